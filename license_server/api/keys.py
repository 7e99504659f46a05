"""``/v1/keys``: ops API keys (admin only) and server key rotation (signing key, KEK)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g

from layerlock.license_server.api.common import body, page_args, require, string
from layerlock.license_server.app import services
from layerlock.license_server.keystore import new_api_key
from layerlock.license_server.roles import ADMINS, Role
from layerlock.license_server.store import apikeys, models, page, webhooks
from layerlock.shared.errors import Conflict, InvalidInput

bp = Blueprint("keys", __name__, url_prefix="/v1/keys")


@bp.post("")
@require(*ADMINS)
def create() -> tuple[dict[str, Any], int]:
    doc = body({"role", "name"}, required=("role",))
    role = doc["role"]
    if not isinstance(role, str) or role not in {r.value for r in Role}:
        raise InvalidInput(f"role must be one of {', '.join(Role)}")
    name = string(doc, "name", "")
    secret = new_api_key()
    svc = services()
    rec = apikeys.create(svc.commits, role, name, secret, actor=g.actor)
    return {**apikeys.public_view(rec), "api_key": secret}, 201


@bp.get("")
@require(*ADMINS)
def list_keys() -> dict[str, Any]:
    cursor, limit = page_args()
    recs, nxt = page(services().redis, apikeys.ALL, apikeys.key, cursor, limit, lambda r: True)
    return {"items": [apikeys.public_view(r) for r in recs], "next_cursor": nxt}


@bp.post("/<key_id>/revoke")
@require(*ADMINS)
def revoke(key_id: str) -> dict[str, Any]:
    body(())
    svc = services()
    if key_id == g.actor:
        raise Conflict("refusing to revoke the key making this request")
    rec = apikeys.revoke(svc.commits, key_id, actor=g.actor)
    return apikeys.public_view(rec)


@bp.post("/rotate-signing")
@require(*ADMINS)
def rotate_signing() -> dict[str, Any]:
    body(())
    svc = services()
    result = svc.keys.rotate_signing()
    svc.commits.append("signing_key_rotated", actor=g.actor, kid=result["kid"])
    return result


@bp.post("/rotate-kek")
@require(*ADMINS)
def rotate_kek() -> dict[str, Any]:
    """New KEK; re-wrap every stored data key under it.  Models are not re-protected.

    Old KEK files are kept (a worker that has not yet re-read the key directory may still seal
    under one for a second); ``unused`` lists those no stored key needs any more, for the
    operator to shred.
    """
    body(())
    svc = services()
    new_id = svc.keys.new_kek()
    rewrapped = 0
    cursor: int | None = 0
    while cursor is not None:
        recs, cursor = page(svc.redis, models.ALL, models.key, cursor, 500, lambda r: r.get("kek_id") != new_id)
        for rec in recs:
            models.rewrap(svc.commits, svc.keys, rec["model_id"], kek_id=new_id, actor=g.actor)
            rewrapped += 1
    cursor = 0
    while cursor is not None:  # webhook signing secrets are sealed under the KEK too
        recs, cursor = page(svc.redis, webhooks.ALL, webhooks.key, cursor, 500, lambda r: r.get("kek_id") != new_id)
        for rec in recs:
            webhooks.rewrap(svc.commits, svc.keys, rec["webhook_id"], kek_id=new_id, actor=g.actor)
    in_use = {r.get("kek_id", "") for index, k in ((models.ALL, models.key), (webhooks.ALL, webhooks.key))
              for r in page(svc.redis, index, k, 0, 10**9, lambda r: True)[0]}
    unused = sorted(set(svc.keys.current.keks) - in_use - {new_id})
    svc.commits.append("kek_rotated", actor=g.actor, kek_id=new_id, rewrapped=rewrapped)
    return {"kek_id": new_id, "rewrapped": rewrapped, "unused": unused}
