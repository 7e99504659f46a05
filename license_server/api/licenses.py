"""``/v1/licenses``: issue, list, show, revoke, extend."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, g, request

from layerlock.license_server import metrics
from layerlock.license_server.api.common import (
    READERS,
    WRITERS,
    body,
    integer,
    machine_code,
    now,
    page_args,
    require,
    string,
)
from layerlock.license_server.app import services
from layerlock.license_server.store import licenses, machines, models, page
from layerlock.license_server.store.audit import Change, GuardFailed
from layerlock.shared.activation import check_model_id
from layerlock.shared.errors import Conflict, InvalidInput

bp = Blueprint("licenses", __name__, url_prefix="/v1/licenses")
MAX_DAYS = 36_500


def _expiry(doc: dict[str, Any], base: int) -> int:
    if ("days" in doc) == ("expires_at" in doc):
        raise InvalidInput("give exactly one of days or expires_at")
    if "days" in doc:
        return base + integer(doc["days"], "days", lo=1, hi=MAX_DAYS) * 86_400
    return integer(doc["expires_at"], "expires_at", lo=now() + 1, hi=now() + MAX_DAYS * 86_400)


@bp.post("")
@require(*WRITERS)
def issue() -> tuple[dict[str, Any], int]:
    doc = body({"machine", "model", "days", "expires_at", "not_before", "token_ttl", "offline_grace", "notes"},
               required=("machine", "model"))
    cfg = services().config
    code = machine_code(doc["machine"])
    model_id = check_model_id(doc["model"])
    t = now()
    not_before = integer(doc.get("not_before", t), "not_before", lo=0, hi=t + MAX_DAYS * 86_400)
    expires_at = _expiry(doc, max(t, not_before))
    if expires_at <= not_before:
        raise InvalidInput("expires_at must be after not_before")
    grace = integer(doc.get("offline_grace", cfg.default_offline_grace), "offline_grace",
                    lo=cfg.min_lifetime, hi=cfg.max_offline_grace)
    ttl = integer(doc.get("token_ttl", min(cfg.default_token_ttl, grace)), "token_ttl",
                  lo=cfg.min_lifetime, hi=grace)
    notes = string(doc, "notes", "", max_len=1000)
    svc = services()
    for _ in range(50):
        machine = machines.get(svc.redis, code)
        if models.get(svc.redis, model_id).get("status") != "active":
            raise Conflict(f"model {model_id} is retired")
        rec = licenses.record(code, model_id, machine.get("customer", ""), not_before, expires_at, ttl, grace,
                              notes)
        # issued only if the machine (and its customer) and the active model are as just read
        guards = Change().guard("eq", models.key(model_id), "status", "active")
        if "customer" in machine:
            guards.guard("eq", machines.key(code), "customer", machine["customer"])
        else:
            guards.guard("present", machines.key(code))
        try:
            licenses.create(svc.audit, rec, guards=guards, actor=g.actor, license=rec["license_id"], machine=code,
                            model=model_id, expires_at=expires_at, not_before=not_before)
            break
        except GuardFailed:
            continue
    else:
        raise Conflict("machine or model is changing too fast; retry")
    metrics.LICENSES_ISSUED.inc()
    return licenses.public_view(rec), 201


@bp.get("")
@require(*READERS)
def list_licenses() -> dict[str, Any]:
    cursor, limit = page_args()
    want = {k: request.args[k] for k in ("machine", "model", "customer") if k in request.args}
    if "machine" in want:
        want["machine"] = machine_code(want["machine"])
    status = request.args.get("status")
    t = time.time()

    def keep(rec: dict[str, str]) -> bool:
        return all(rec.get(k) == v for k, v in want.items()) and (
            status is None or licenses.state(rec, t) == status)

    recs, nxt = page(services().redis, licenses.ALL, licenses.key, cursor, limit, keep)
    return {"items": [licenses.public_view(r) for r in recs], "next_cursor": nxt}


@bp.get("/<license_id>")
@require(*READERS)
def show(license_id: str) -> dict[str, Any]:
    return licenses.public_view(licenses.get(services().redis, license_id))


@bp.post("/<license_id>/revoke")
@require(*WRITERS)
def revoke(license_id: str) -> dict[str, Any]:
    doc = body({"reason"})
    reason = string(doc, "reason", "", max_len=500)
    svc = services()

    def change(rec: dict[str, str]) -> dict[str, str]:
        if rec.get("status") == "revoked":
            raise Conflict(f"license {license_id} is already revoked")
        return {"status": "revoked", "revoked_at": str(now()), "revoke_reason": reason}

    _, after = licenses.mutate(svc.audit, license_id, change, lambda before, after: (
        "license_revoked", {"license": license_id, "machine": after["machine"], "model": after["model"],
                            "reason": reason}), actor=g.actor)
    return licenses.public_view(after)


@bp.post("/<license_id>/extend")
@require(*WRITERS)
def extend(license_id: str) -> dict[str, Any]:
    doc = body({"days", "expires_at"})
    _expiry(doc, 0)  # validate the body before touching anything
    svc = services()

    def change(rec: dict[str, str]) -> dict[str, str]:
        if rec.get("status") == "revoked":
            raise Conflict(f"license {license_id} is revoked; issue a new one")
        new = _expiry(doc, max(int(rec["expires_at"]), now()))
        if new <= int(rec["expires_at"]):
            raise InvalidInput("the new expiry must be later than the current one")
        return {"expires_at": str(new)}

    _, after = licenses.mutate(svc.audit, license_id, change, lambda before, after: (
        "license_extended", {"license": license_id, "machine": after["machine"], "model": after["model"],
                             "old_expires_at": int(before["expires_at"]), "expires_at": int(after["expires_at"])}),
        actor=g.actor)
    return licenses.public_view(after)
