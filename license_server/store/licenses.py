"""Licenses: which machine may unlock which model, when, and whether it was revoked.

Three kinds (``kind``): ``node`` — one machine (today's license, and every license issued
before kinds existed); ``seats`` — up to ``seats`` machines of one customer, each keeping its
seat until ops release it (or, with a ``lease_ttl``, until it stops renewing); ``floating`` —
up to ``seats`` machines of the customer *at once*, each holding a lease that its renewals
extend (:mod:`layerlock.license_server.store.seats`).  Each names one model, or a model
``family`` with a version rule (:mod:`layerlock.license_server.entitlements`).  The activation
finds a machine's candidate licenses in one read through four index sets (:func:`index_key`):
the machine's and its customer's, for the model and for the model's family.

Issue, revoke and extend commit with their audit record in one step (``AuditLog.commit``).
Revoke and extend are applied only if the license hash is still exactly as read, and an
activation commits its grant only if the fields its token was built from are unchanged, so
concurrent operators and racing activations always end in one of the serial orders.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from layerlock.license_server.redis_conn import RedisClient
from layerlock.license_server.store import P, new_id, now_ms
from layerlock.license_server.store.commit import Change, Commits
from layerlock.shared.errors import NotFound

ALL = P + "licenses"
#: Bumped by every activation; a revoke or extend does not depend on them (no retry storm).
COUNTERS = frozenset({"activations", "last_activation"})
#: ``wk_<suite>``: the data key sealed to the machine, cached by the first grant (see
#: ``api/activation.py``); written by activations, so, like the counters, no guard of ops' writes.
WK_PREFIX = "wk_"


def key(license_id: str) -> str:
    return f"{P}license:{license_id}"


#: License kinds: one machine, a customer's pool of seats, a customer's floating leases.
KINDS = ("node", "seats", "floating")
#: Family version rules: every version; versions up to ``max_version``; versions released before
#: the license's expiry, which stay licensed after it (Keygen's MAINTAIN_ACCESS).
VERSION_RULES = ("all", "max", "maintain")
#: Optional terms beyond the original record (absent in licenses issued before they existed).
TERMS = ("kind", "family", "versions", "max_version", "seats", "lease_ttl", "revive_ttl", "airgap_ttl")


def pair_key(machine: str, model: str) -> str:
    return f"{P}lic:{machine}:{model}"


def pool_key(customer: str, model: str) -> str:
    """Set of a customer's pool (seats / floating) license ids for a model (``@family``: a family)."""
    return f"{P}clic:{customer}:{model}"


def family_target(family: str) -> str:
    """What stands for a family in an index key: model ids never start with ``@``."""
    return "@" + family


def kind_of(rec: dict[str, str]) -> str:
    return rec.get("kind") or "node"


def pooled(rec: dict[str, str]) -> bool:
    """Whether the license is a customer's pool of seats (seats or floating)."""
    return kind_of(rec) != "node"


def index_key(rec: dict[str, str]) -> str:
    """The index set the activation's read finds this license through."""
    target = family_target(rec["family"]) if rec.get("family") else rec["model"]
    return pool_key(rec["customer"], target) if pooled(rec) else pair_key(rec["machine"], target)


def record(machine: str, model: str, customer: str, not_before: int, expires_at: int, token_ttl: int,
           offline_grace: int, notes: str = "", license_id: str | None = None,
           issued: int | None = None, terms: dict[str, str] | None = None) -> dict[str, str]:
    """``terms``: any of :data:`TERMS` (absent: a node license for ``model``)."""
    rec = {"license_id": license_id or new_id("lic"), "machine": machine, "model": model,
           "customer": customer, "issued_at": str(issued or now_ms()), "not_before": str(not_before),
           "expires_at": str(expires_at), "token_ttl": str(token_ttl), "offline_grace": str(offline_grace),
           "notes": notes, "status": "active", "activations": "0"}
    rec.update({k: str(v) for k, v in (terms or {}).items() if k in TERMS})
    return rec


def create(commits: Commits, rec: dict[str, str], *, guards: Change | None = None, actor: str,
           **event: Any) -> None:
    """Store the license with its ``license_issued`` record, atomically (under ``guards``)."""
    change = (guards or Change()).hset(key(rec["license_id"]), rec)
    change.write("ZADD", ALL, rec["issued_at"], rec["license_id"])
    change.write("SADD", index_key(rec), rec["license_id"])
    commits.commit("license_issued", change, actor=actor, **event)


def get(r: RedisClient, license_id: str) -> dict[str, str]:
    rec: dict[str, str] = r.hgetall(key(license_id))
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


def mutate(commits: Commits, license_id: str, change: Callable[[dict[str, str]], dict[str, str]],
           event: Callable[[dict[str, str], dict[str, str]], tuple[str, dict[str, Any]]], *,
           actor: str) -> tuple[dict[str, str], dict[str, str]]:
    """Read, ``change(before) -> fields``, and commit the fields with the audit record
    ``event(before, after) -> (type, fields)`` only if the license is still as read (bar the
    activation counters), else again; returns (before, after)."""
    k = key(license_id)

    def as_read_but_counters(txn: Change, before: dict[str, str]) -> Change:
        for f, v in before.items():  # the counters every activation bumps do not matter here
            if f not in COUNTERS and not f.startswith(WK_PREFIX):
                txn.guard("eq", k, f, v)
        return txn

    return commits.update_hash(k, change, event, guard=as_read_but_counters, actor=actor,
                             missing=f"license {license_id} does not exist", what="license")


def public_view(rec: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {k: rec.get(k, "") for k in ("license_id", "machine", "model", "customer", "notes")}
    for k in ("not_before", "expires_at", "token_ttl", "offline_grace", "activations"):
        out[k] = int(rec.get(k, 0))
    out["issued_at"] = int(rec["issued_at"]) // 1000
    out["status"] = state(rec)
    out["kind"] = kind_of(rec)
    if rec.get("family"):
        out.update(family=rec["family"], versions=rec.get("versions", "all"))
        if rec.get("max_version"):
            out["max_version"] = rec["max_version"]
    if pooled(rec):
        for k in ("seats", "lease_ttl", "revive_ttl"):
            out[k] = int(rec.get(k, 0))
    if rec.get("airgap_ttl"):
        out["airgap_ttl"] = int(rec["airgap_ttl"])
    if rec.get("status") == "revoked":
        out["revoked_at"] = int(rec.get("revoked_at", 0))
        out["revoke_reason"] = rec.get("revoke_reason", "")
    return out
