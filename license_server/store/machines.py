"""Registered machines: who they are (public keys, device class) and whether they may activate."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from layerlock.license_server.redis_conn import RedisClient
from layerlock.license_server.store import P, dumps, now_ms
from layerlock.license_server.store.commit import Commits
from layerlock.shared.enrollment import DeviceClass, Enrollment
from layerlock.shared.errors import NotFound
from layerlock.shared.keys import b64u_encode

ALL = P + "machines"


def key(code: str) -> str:
    return f"{P}machine:{code}"


def record(code: str, customer: str, labels: dict[str, str], enrollment: Enrollment | None,
           created: int | None = None) -> dict[str, str]:
    """The hash stored for a machine (also used by the benchmark's bulk loader)."""
    rec = {"code": code, "customer": customer, "labels": dumps(labels), "status": "active",
           "created_at": str(created or now_ms())}
    if enrollment is not None:
        rec.update(enrollment_fields(enrollment))
    return rec


def enrollment_fields(e: Enrollment) -> dict[str, str]:
    out = {"sig_pub": b64u_encode(e.sig_pub), "kex_pub": b64u_encode(e.kex_pub),
           "device": dumps(asdict(e.device))}
    if e.pq_pub is not None:
        out["pq_pub"] = b64u_encode(e.pq_pub)
    return out


def create(commits: Commits, rec: dict[str, str], *, actor: str, **event: Any) -> None:
    """Register atomically with its ``machine_registered`` record; a code registered twice is a
    Conflict (no silent key replacement)."""
    commits.insert("machine_registered", key(rec["code"]), rec, index=(ALL, rec["created_at"], rec["code"]),
                   exists=f"machine {rec['code']} is already registered", actor=actor, **event)


def get(r: RedisClient, code: str) -> dict[str, str]:
    rec: dict[str, str] = r.hgetall(key(code))
    if not rec:
        raise NotFound(f"machine {code} is not registered")
    return rec


def update(commits: Commits, code: str, change: Callable[[dict[str, str]], dict[str, str]], type_: str, *,
           actor: str, **event: Any) -> dict[str, str]:
    """Read, compute ``change(rec) -> fields``, write them with the audit record if the machine
    is still as read (else again); returns the updated record."""
    k = key(code)
    _, after = commits.update_hash(k, change, lambda _before, _after: (type_, event),
                                 guard=lambda txn, before: txn.same_hash(k, before), actor=actor,
                                 missing=f"machine {code} is not registered", what="machine")
    return after


def public_view(rec: dict[str, str]) -> dict[str, Any]:
    return {"machine": rec["code"], "customer": rec.get("customer", ""),
            "labels": json.loads(rec.get("labels", "{}")), "status": rec.get("status", "active"),
            "created_at": int(rec["created_at"]) // 1000, "enrolled": "sig_pub" in rec,
            "device": json.loads(rec["device"]) if "device" in rec else None,
            "post_quantum": "pq_pub" in rec,
            **({"claim_expires_at": int(rec["claim_expires_at"])} if "claim_id" in rec and "sig_pub" not in rec
               else {})}


def device_of(rec: dict[str, str]) -> DeviceClass:
    return DeviceClass(**json.loads(rec["device"])) if "device" in rec else DeviceClass()
