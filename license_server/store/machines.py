"""Registered machines: who they are (public keys, device class) and whether they may activate."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import redis

from license_server.redis_conn import Client
from license_server.store import P, dumps, now_ms
from shared.enrollment import DeviceClass, Enrollment
from shared.errors import Conflict, NotFound
from shared.keys import b64u_encode

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


def create(r: Client, rec: dict[str, str]) -> None:
    """Register atomically; a code registered twice is a Conflict (no silent key replacement)."""
    with r.pipeline() as pipe:
        pipe.watch(key(rec["code"]))
        if pipe.exists(key(rec["code"])):
            raise Conflict(f"machine {rec['code']} is already registered")
        pipe.multi()
        pipe.hset(key(rec["code"]), mapping=rec)
        pipe.zadd(ALL, {rec["code"]: int(rec["created_at"])})
        pipe.execute()


def get(r: Client, code: str) -> dict[str, str]:
    rec = r.hgetall(key(code))
    if not rec:
        raise NotFound(f"machine {code} is not registered")
    return rec


def bind_tofu(r: Client, code: str, enrollment: Enrollment) -> bool:
    """Trust on first use: store the keys only if the machine still has none (atomic)."""
    with r.pipeline() as pipe:
        pipe.watch(key(code))
        if pipe.hexists(key(code), "sig_pub"):
            return False
        pipe.multi()
        pipe.hset(key(code), mapping=enrollment_fields(enrollment))
        try:
            pipe.execute()
        except redis.WatchError:
            return False
    return True


def update(r: Client, code: str, fields: dict[str, str]) -> dict[str, str]:
    with r.pipeline() as pipe:
        pipe.watch(key(code))
        if not pipe.exists(key(code)):
            raise NotFound(f"machine {code} is not registered")
        pipe.multi()
        pipe.hset(key(code), mapping=fields)
        pipe.execute()
    return get(r, code)


def public_view(rec: dict[str, str]) -> dict[str, Any]:
    return {"machine": rec["code"], "customer": rec.get("customer", ""),
            "labels": json.loads(rec.get("labels", "{}")), "status": rec.get("status", "active"),
            "created_at": int(rec["created_at"]) // 1000, "enrolled": "sig_pub" in rec,
            "device": json.loads(rec["device"]) if "device" in rec else None,
            "post_quantum": "pq_pub" in rec}


def device_of(rec: dict[str, str]) -> DeviceClass:
    return DeviceClass(**json.loads(rec["device"])) if "device" in rec else DeviceClass()
