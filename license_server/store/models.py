"""Protected models and their data keys, stored only sealed under the server's KEK."""

from __future__ import annotations

from typing import Any

from layerlock.license_server.redis_conn import RedisClient
from layerlock.license_server.store import P, now_ms
from layerlock.license_server.store.commit import Change, Commits, until_committed
from layerlock.shared.errors import Conflict, NotFound

ALL = P + "models"


def key(model_id: str) -> str:
    return f"{P}model:{model_id}"


def create(commits: Commits, rec: dict[str, str], *, actor: str, **event: Any) -> None:
    """Register with its ``model_registered`` record, atomically; twice is a Conflict."""
    commits.insert("model_registered", key(rec["model_id"]), rec, index=(ALL, rec["created_at"], rec["model_id"]),
                   exists=f"model {rec['model_id']} is already registered", actor=actor, **event)


def record(model_id: str, name: str, version: str, wrapped: str, kek_id: str, *, family: str = "",
           released_at: int | None = None) -> dict[str, str]:
    """``family``: the model family this id is a version of (family licenses,
    :mod:`layerlock.license_server.entitlements`); ``released_at`` (Unix s): defaults to now."""
    created = now_ms()
    rec = {"model_id": model_id, "name": name, "version": version, "status": "active",
           "wrapped_key": wrapped, "kek_id": kek_id, "created_at": str(created),
           "released_at": str(created // 1000 if released_at is None else released_at)}
    if family:
        rec["family"] = family
    return rec


def get(r: RedisClient, model_id: str) -> dict[str, str]:
    rec: dict[str, str] = r.hgetall(key(model_id))
    if not rec:
        raise NotFound(f"model {model_id} is not registered")
    return rec


def retire(commits: Commits, model_id: str, *, actor: str) -> dict[str, str]:
    """Mark retired with its ``model_retired`` record, atomically; retired twice is a Conflict."""
    k = key(model_id)

    def attempt() -> dict[str, str]:
        rec = get(commits.r, model_id)
        if rec.get("status") == "retired":
            raise Conflict(f"model {model_id} is already retired")
        change = Change().guard("eq", k, "status", rec.get("status", "")).hset(k, {"status": "retired"})
        commits.commit("model_retired", change, actor=actor, model=model_id)
        return {**rec, "status": "retired"}

    return until_committed(attempt, what=f"model {model_id}")


def rewrap(commits: Commits, keys: Any, model_id: str, *, kek_id: str, actor: str) -> None:
    """Re-seal the model's data key under the KEK ``kek_id`` (KEK rotation) with its
    ``data_key_rewrapped`` record, reading again if somebody changed the sealed key meanwhile.
    ``keys`` is the server's :class:`~layerlock.license_server.keystore.KeyStore`."""
    k = key(model_id)

    def attempt() -> None:
        old = get(commits.r, model_id)
        if old.get("kek_id") == kek_id:
            return
        data_key = keys.open_data_key(old["wrapped_key"], old["kek_id"], model_id)
        wrapped, new_kek = keys.seal_data_key(data_key, model_id)
        change = Change().guard("eq", k, "wrapped_key", old["wrapped_key"]).hset(k, {"wrapped_key": wrapped,
                                                                                    "kek_id": new_kek})
        commits.commit("data_key_rewrapped", change, actor=actor, model=model_id, old_kek_id=old.get("kek_id", ""),
                       kek_id=new_kek)

    until_committed(attempt, what=f"model {model_id}")


def public_view(rec: dict[str, str]) -> dict[str, Any]:
    """Never includes the sealed key: not even its KEK-sealed form leaves the server."""
    return {"model_id": rec["model_id"], "name": rec.get("name", ""), "version": rec.get("version", ""),
            "family": rec.get("family", ""), "status": rec.get("status", "active"), "kek_id": rec.get("kek_id", ""),
            "created_at": int(rec["created_at"]) // 1000,
            "released_at": int(rec.get("released_at") or int(rec["created_at"]) // 1000)}
