"""Ops API keys: stored as SHA-256 only, looked up by hash, compared in constant time."""

from __future__ import annotations

import hmac
from typing import Any

from license_server.keystore import hash_api_key
from license_server.redis_conn import Client
from license_server.store import P, new_id, now_ms
from shared.errors import NotFound

ROLES = ("admin", "operator", "auditor")
ALL = P + "apikeys"


def key(key_id: str) -> str:
    return f"{P}apikey:{key_id}"


def by_hash(h: str) -> str:
    return f"{P}apikey-hash:{h}"


def create(r: Client, role: str, name: str, secret: str, key_id: str | None = None) -> dict[str, str]:
    rec = {"id": key_id or new_id("key"), "role": role, "name": name, "hash": hash_api_key(secret),
           "status": "active", "created_at": str(now_ms())}
    with r.pipeline() as pipe:
        pipe.hset(key(rec["id"]), mapping=rec)
        pipe.set(by_hash(rec["hash"]), rec["id"])
        pipe.zadd(ALL, {rec["id"]: int(rec["created_at"])})
        pipe.execute()
    return rec


def ensure_bootstrap(r: Client, key_hash: str) -> bool:
    """Insert the init-time admin key once (never resurrect it after a revoke)."""
    key_id = "key_bootstrap_" + key_hash[:8]
    if not r.hsetnx(key(key_id), "id", key_id):
        return False
    rec = {"role": "admin", "name": "bootstrap admin (layerlock init)", "hash": key_hash,
           "status": "active", "created_at": str(now_ms())}
    with r.pipeline() as pipe:
        pipe.hset(key(key_id), mapping=rec)
        pipe.set(by_hash(key_hash), key_id)
        pipe.zadd(ALL, {key_id: int(rec["created_at"])})
        pipe.execute()
    return True


def authenticate(r: Client, secret: str) -> dict[str, str] | None:
    h = hash_api_key(secret)
    key_id = r.get(by_hash(h))
    if not key_id:
        return None
    rec = r.hgetall(key(key_id))
    if not rec or rec.get("status") != "active" or not hmac.compare_digest(rec.get("hash", ""), h):
        return None
    return rec


def revoke(r: Client, key_id: str) -> dict[str, str]:
    rec = r.hgetall(key(key_id))
    if not rec:
        raise NotFound(f"API key {key_id} does not exist")
    r.hset(key(key_id), "status", "revoked")
    return {**rec, "status": "revoked"}


def public_view(rec: dict[str, str]) -> dict[str, Any]:
    return {"id": rec["id"], "role": rec.get("role", ""), "name": rec.get("name", ""),
            "status": rec.get("status", ""), "created_at": int(rec.get("created_at", 0)) // 1000}
