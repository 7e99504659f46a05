"""Protected models and their data keys, stored only sealed under the server's KEK."""

from __future__ import annotations

from typing import Any

import redis

from license_server.redis_conn import Client
from license_server.store import P, now_ms
from shared.errors import Conflict, NotFound

ALL = P + "models"


def key(model_id: str) -> str:
    return f"{P}model:{model_id}"


def create(r: Client, rec: dict[str, str]) -> None:
    with r.pipeline() as pipe:
        pipe.watch(key(rec["model_id"]))
        if pipe.exists(key(rec["model_id"])):
            raise Conflict(f"model {rec['model_id']} is already registered")
        pipe.multi()
        pipe.hset(key(rec["model_id"]), mapping=rec)
        pipe.zadd(ALL, {rec["model_id"]: int(rec["created_at"])})
        pipe.execute()


def record(model_id: str, name: str, version: str, wrapped: str, kek_id: str) -> dict[str, str]:
    return {"model_id": model_id, "name": name, "version": version, "status": "active",
            "wrapped_key": wrapped, "kek_id": kek_id, "created_at": str(now_ms())}


def get(r: Client, model_id: str) -> dict[str, str]:
    rec = r.hgetall(key(model_id))
    if not rec:
        raise NotFound(f"model {model_id} is not registered")
    return rec


def retire(r: Client, model_id: str) -> dict[str, str]:
    with r.pipeline() as pipe:
        pipe.watch(key(model_id))
        if not pipe.exists(key(model_id)):
            raise NotFound(f"model {model_id} is not registered")
        pipe.multi()
        pipe.hset(key(model_id), "status", "retired")
        pipe.execute()
    return get(r, model_id)


def rewrap(r: Client, model_id: str, old: dict[str, str], wrapped: str, kek_id: str) -> bool:
    """Compare-and-set the sealed key (KEK rotation): only if nobody changed it meanwhile."""
    with r.pipeline() as pipe:
        pipe.watch(key(model_id))
        if pipe.hget(key(model_id), "wrapped_key") != old["wrapped_key"]:
            return False
        pipe.multi()
        pipe.hset(key(model_id), mapping={"wrapped_key": wrapped, "kek_id": kek_id})
        try:
            pipe.execute()
        except redis.WatchError:
            return False
    return True


def public_view(rec: dict[str, str]) -> dict[str, Any]:
    """Never includes the sealed key: not even its KEK-sealed form leaves the server."""
    return {"model_id": rec["model_id"], "name": rec.get("name", ""), "version": rec.get("version", ""),
            "status": rec.get("status", "active"), "kek_id": rec.get("kek_id", ""),
            "created_at": int(rec["created_at"]) // 1000}
