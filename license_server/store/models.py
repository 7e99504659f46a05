"""Protected models and their data keys, stored only sealed under the server's KEK."""

from __future__ import annotations

from typing import Any

from layerlock.license_server.redis_conn import Client
from layerlock.license_server.store import P, now_ms
from layerlock.license_server.store.audit import AuditLog, Change, GuardFailed
from layerlock.shared.errors import Conflict, NotFound

ALL = P + "models"


def key(model_id: str) -> str:
    return f"{P}model:{model_id}"


def create(audit: AuditLog, rec: dict[str, str], *, actor: str, **event: Any) -> None:
    """Register with its ``model_registered`` record, atomically; twice is a Conflict."""
    k = key(rec["model_id"])
    change = Change().guard("absent", k).hset(k, rec).write("ZADD", ALL, rec["created_at"], rec["model_id"])
    try:
        audit.commit("model_registered", change, actor=actor, **event)
    except GuardFailed:
        raise Conflict(f"model {rec['model_id']} is already registered") from None


def record(model_id: str, name: str, version: str, wrapped: str, kek_id: str) -> dict[str, str]:
    return {"model_id": model_id, "name": name, "version": version, "status": "active",
            "wrapped_key": wrapped, "kek_id": kek_id, "created_at": str(now_ms())}


def get(r: Client, model_id: str) -> dict[str, str]:
    rec = r.hgetall(key(model_id))
    if not rec:
        raise NotFound(f"model {model_id} is not registered")
    return rec


def retire(audit: AuditLog, model_id: str, *, actor: str) -> dict[str, str]:
    """Mark retired with its ``model_retired`` record, atomically; retired twice is a Conflict."""
    k = key(model_id)
    for _ in range(50):
        rec = get(audit.r, model_id)
        if rec.get("status") == "retired":
            raise Conflict(f"model {model_id} is already retired")
        change = Change().guard("eq", k, "status", rec.get("status", "")).hset(k, {"status": "retired"})
        try:
            audit.commit("model_retired", change, actor=actor, model=model_id)
        except GuardFailed:
            continue
        return {**rec, "status": "retired"}
    raise Conflict("model is being changed by too many clients at once; retry")


def rewrap(audit: AuditLog, model_id: str, old: dict[str, str], wrapped: str, kek_id: str, *,
           actor: str) -> bool:
    """Compare-and-set the sealed key (KEK rotation) with its ``data_key_rewrapped`` record, only if
    nobody changed it meanwhile; False if somebody did."""
    k = key(model_id)
    change = Change().guard("eq", k, "wrapped_key", old["wrapped_key"]).hset(k, {"wrapped_key": wrapped,
                                                                                "kek_id": kek_id})
    try:
        audit.commit("data_key_rewrapped", change, actor=actor, model=model_id, old_kek_id=old.get("kek_id", ""),
                     kek_id=kek_id)
    except GuardFailed:
        return False
    return True


def public_view(rec: dict[str, str]) -> dict[str, Any]:
    """Never includes the sealed key: not even its KEK-sealed form leaves the server."""
    return {"model_id": rec["model_id"], "name": rec.get("name", ""), "version": rec.get("version", ""),
            "status": rec.get("status", "active"), "kek_id": rec.get("kek_id", ""),
            "created_at": int(rec["created_at"]) // 1000}
