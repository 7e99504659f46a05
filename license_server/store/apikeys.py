"""Ops API keys: stored as SHA-256 only, looked up by hash, compared in constant time."""

from __future__ import annotations

import hmac
from typing import Any

from layerlock.license_server.keystore import hash_api_key
from layerlock.license_server.redis_conn import RedisClient
from layerlock.license_server.roles import Role
from layerlock.license_server.store import P, new_id, now_ms
from layerlock.license_server.store.commit import Change, Commits, GuardFailed
from layerlock.shared.errors import NotFound

ALL = P + "apikeys"


def key(key_id: str) -> str:
    return f"{P}apikey:{key_id}"


def by_hash(h: str) -> str:
    return f"{P}apikey-hash:{h}"


def _insert(rec: dict[str, str]) -> Change:
    return (Change().guard("absent", key(rec["id"])).hset(key(rec["id"]), rec)
            .write("SET", by_hash(rec["hash"]), rec["id"]).write("ZADD", ALL, rec["created_at"], rec["id"]))


def create(commits: Commits, role: str, name: str, secret: str, *, actor: str) -> dict[str, str]:
    """Store a new key (hash only) with its ``apikey_created`` record, atomically."""
    rec = {"id": new_id("key"), "role": role, "name": name, "hash": hash_api_key(secret),
           "status": "active", "created_at": str(now_ms())}
    commits.commit("apikey_created", _insert(rec), actor=actor, key_id=rec["id"], role=role)
    return rec


def ensure_bootstrap(commits: Commits, key_hash: str) -> bool:
    """Insert the init-time admin key once (never resurrect it after a revoke), with its record."""
    key_id = "key_bootstrap_" + key_hash[:8]
    if commits.r.exists(key(key_id)):
        return False
    rec = {"id": key_id, "role": Role.ADMIN.value, "name": "bootstrap admin (layerlock init)", "hash": key_hash,
           "status": "active", "created_at": str(now_ms())}
    try:
        commits.commit("apikey_created", _insert(rec), actor="init", key_id=key_id, role=Role.ADMIN.value)
    except GuardFailed:
        return False  # another worker inserted it first
    return True


def authenticate(r: RedisClient, secret: str) -> dict[str, str] | None:
    h = hash_api_key(secret)
    key_id = r.get(by_hash(h))
    if not key_id:
        return None
    rec: dict[str, str] = r.hgetall(key(key_id))
    if not rec or rec.get("status") != "active" or not hmac.compare_digest(rec.get("hash", ""), h):
        return None
    return rec


def revoke(commits: Commits, key_id: str, *, actor: str) -> dict[str, str]:
    """Mark revoked with its ``apikey_revoked`` record, atomically."""
    rec = commits.r.hgetall(key(key_id))
    if not rec:
        raise NotFound(f"API key {key_id} does not exist")
    change = Change().guard("present", key(key_id)).hset(key(key_id), {"status": "revoked"})
    try:
        commits.commit("apikey_revoked", change, actor=actor, key_id=key_id)
    except GuardFailed:
        raise NotFound(f"API key {key_id} does not exist") from None
    return {**rec, "status": "revoked"}


def public_view(rec: dict[str, str]) -> dict[str, Any]:
    return {"id": rec["id"], "role": rec.get("role", ""), "name": rec.get("name", ""),
            "status": rec.get("status", ""), "created_at": int(rec.get("created_at", 0)) // 1000}
