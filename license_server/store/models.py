"""Protected models and their data keys, stored only sealed under the server's KEK.

A fingerprinted model's fingerprint secret (:mod:`layerlock.shared.fingerprint`: its chip key and
the original values at the fingerprint positions) is sealed under the same KEK and kept apart, in
``{ll}:model:<id>:fp``, because the activation snapshot reads the model hash on every request and
the secret is tens of kilobytes: it is read only when a license's ``wk`` is sealed afresh.
"""

from __future__ import annotations

from typing import Any

from layerlock.license_server.redis_conn import RedisClient
from layerlock.license_server.store import P, now_ms
from layerlock.license_server.store.commit import Change, Commits, GuardFailed, until_committed
from layerlock.shared.errors import Conflict, NotFound

ALL = P + "models"


def key(model_id: str) -> str:
    return f"{P}model:{model_id}"


#: The KEK binding of a fingerprint secret: never confusable with the model's data key.
FP_BINDING = "\0fingerprint"


def fp_key(model_id: str) -> str:
    return f"{P}model:{model_id}:fp"


def create(commits: Commits, rec: dict[str, str], *, actor: str, fingerprint: str | None = None,
           **event: Any) -> None:
    """Register with its ``model_registered`` record (and its KEK-sealed fingerprint secret),
    atomically; twice is a Conflict."""
    k = key(rec["model_id"])
    change = Change().guard("absent", k).hset(k, rec).write("ZADD", ALL, rec["created_at"], rec["model_id"])
    if fingerprint is not None:
        change.write("SET", fp_key(rec["model_id"]), fingerprint)
    try:
        commits.commit("model_registered", change, actor=actor, **event)
    except GuardFailed:
        raise Conflict(f"model {rec['model_id']} is already registered") from None


def fingerprint(r: RedisClient, model_id: str) -> str | None:
    """The KEK-sealed fingerprint secret of a model, or None when it has none."""
    blob: str | None = r.get(fp_key(model_id))
    return blob


def record(model_id: str, name: str, version: str, wrapped: str, kek_id: str, *, family: str = "",
           released_at: int | None = None, fp_positions: int = 0, fp_digest: str = "") -> dict[str, str]:
    """``family``: the model family this id is a version of (family licenses,
    :mod:`layerlock.license_server.entitlements`); ``released_at`` (Unix s): defaults to now.
    ``fp_positions``/``fp_digest``: the fingerprint's size and a digest of its sealed secret
    (workers cache the opened secret under it)."""
    created = now_ms()
    rec = {"model_id": model_id, "name": name, "version": version, "status": "active",
           "wrapped_key": wrapped, "kek_id": kek_id, "created_at": str(created),
           "released_at": str(created // 1000 if released_at is None else released_at)}
    if family:
        rec["family"] = family
    if fp_positions:
        rec["fp_positions"], rec["fp_digest"] = str(fp_positions), fp_digest
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
        sealed_fp = fingerprint(commits.r, model_id) if old.get("fp_positions") else None
        if sealed_fp is not None:  # sealed under the same KEK: re-sealed with it
            secret = keys.open_data_key(sealed_fp, old["kek_id"], model_id + FP_BINDING)
            change.write("SET", fp_key(model_id), keys.seal_data_key(secret, model_id + FP_BINDING)[0])
        commits.commit("data_key_rewrapped", change, actor=actor, model=model_id, old_kek_id=old.get("kek_id", ""),
                       kek_id=new_kek)

    until_committed(attempt, what=f"model {model_id}")


def public_view(rec: dict[str, str]) -> dict[str, Any]:
    """Never includes the sealed key: not even its KEK-sealed form leaves the server."""
    return {"model_id": rec["model_id"], "name": rec.get("name", ""), "version": rec.get("version", ""),
            "family": rec.get("family", ""), "status": rec.get("status", "active"), "kek_id": rec.get("kek_id", ""),
            "created_at": int(rec["created_at"]) // 1000, "fingerprint_positions": int(rec.get("fp_positions", 0)),
            "released_at": int(rec.get("released_at") or int(rec["created_at"]) // 1000)}
