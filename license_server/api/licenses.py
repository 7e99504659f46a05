"""``/v1/licenses``: issue, list, show, revoke, extend; a pool license's seats: list, release.

A license is for one ``machine`` (kind ``node``), or for a ``customer``'s pool of ``seats``
(kind ``seats``: node-locked, held until released or, with a ``lease_ttl``, until not renewed;
kind ``floating``: concurrent leases that renewals extend).  It names a ``model``, or a
``family`` with a ``versions`` rule (``all``, ``max`` with ``max_version``, ``maintain``).
See :mod:`layerlock.license_server.store.licenses` and :mod:`layerlock.license_server.entitlements`.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, g, request

from layerlock.license_server import entitlements, metrics
from layerlock.license_server.api.common import (
    body,
    integer,
    machine_code,
    now,
    page_args,
    require,
    string,
)
from layerlock.license_server.app import services
from layerlock.license_server.roles import READERS, WRITERS
from layerlock.license_server.store import licenses, machines, models, page, seats
from layerlock.license_server.store.commit import Change, until_committed
from layerlock.shared.errors import Conflict, InvalidInput
from layerlock.shared.ids import check_model_id

bp = Blueprint("licenses", __name__, url_prefix="/v1/licenses")
MAX_DAYS = 36_500


def _expiry(doc: dict[str, Any], base: int) -> int:
    if ("days" in doc) == ("expires_at" in doc):
        raise InvalidInput("give exactly one of days or expires_at")
    if "days" in doc:
        return base + integer(doc["days"], "days", lo=1, hi=MAX_DAYS) * 86_400
    return integer(doc["expires_at"], "expires_at", lo=now() + 1, hi=now() + MAX_DAYS * 86_400)


ISSUE_FIELDS = {"machine", "customer", "model", "family", "versions", "max_version", "kind", "seats", "lease_ttl",
                "revive_ttl", "airgap_ttl", "days", "expires_at", "not_before", "token_ttl", "offline_grace", "notes"}
MAX_SEATS = 1_000_000


def _terms(doc: dict[str, Any], grace: int) -> tuple[dict[str, str], int]:
    """The kind, seat, lease, family and air-gap terms of a new license, and its token_ttl."""
    cfg = services().config
    life = {"lo": cfg.min_lifetime, "hi": cfg.max_offline_grace}
    kind = doc.get("kind", "seats" if "seats" in doc else "node")
    if kind not in licenses.KINDS:
        raise InvalidInput(f"kind must be one of {', '.join(licenses.KINDS)}")
    terms: dict[str, str] = {"kind": kind} if kind != "node" else {}
    if ("model" in doc) == ("family" in doc):
        raise InvalidInput("give exactly one of model or family")
    if "family" in doc:
        terms["family"] = check_model_id(doc["family"], field="family")
        rule = doc.get("versions", "all")
        if rule not in licenses.VERSION_RULES:
            raise InvalidInput(f"versions must be one of {', '.join(licenses.VERSION_RULES)}")
        terms["versions"] = rule
        if (rule == "max") != ("max_version" in doc):
            raise InvalidInput("max_version goes with versions=max, and only with it")
        if rule == "max":
            terms["max_version"] = string(doc, "max_version", max_len=40)
            if entitlements.version_key(terms["max_version"]) is None:
                raise InvalidInput("max_version must be dotted numbers (3, 1.2, 2.0.1)")
    elif "versions" in doc or "max_version" in doc:
        raise InvalidInput("versions and max_version go with family")
    ttl = integer(doc["token_ttl"], "token_ttl", lo=cfg.min_lifetime, hi=grace) if "token_ttl" in doc else None
    if kind == "node":
        if "machine" not in doc or any(k in doc for k in ("customer", "seats", "lease_ttl", "revive_ttl")):
            raise InvalidInput("a node license names a machine (and no customer, seats or lease)")
    else:
        if "machine" in doc or "customer" not in doc or "seats" not in doc:
            raise InvalidInput(f"a {kind} license names a customer and its seats (no machine)")
        terms["seats"] = str(integer(doc["seats"], "seats", lo=1, hi=MAX_SEATS))
        lease = integer(doc["lease_ttl"], "lease_ttl", **life) if "lease_ttl" in doc else (
            (ttl or min(cfg.default_token_ttl, grace)) if kind == "floating" else 0)
        if lease and ttl is not None and ttl > lease:
            raise InvalidInput("token_ttl must not exceed lease_ttl (a token never outlives its lease)")
        if lease:
            ttl = ttl or min(cfg.default_token_ttl, grace, lease)
            terms["lease_ttl"] = str(lease)
            terms["revive_ttl"] = str(integer(doc.get("revive_ttl", lease), "revive_ttl", lo=0,
                                              hi=cfg.max_offline_grace))
        elif "revive_ttl" in doc:
            raise InvalidInput("revive_ttl goes with a lease (lease_ttl)")
    if "airgap_ttl" in doc:
        terms["airgap_ttl"] = str(integer(doc["airgap_ttl"], "airgap_ttl", **life))
    return terms, ttl or min(cfg.default_token_ttl, grace)


@bp.post("")
@require(*WRITERS)
def issue() -> tuple[dict[str, Any], int]:
    doc = body(ISSUE_FIELDS)
    cfg = services().config
    t = now()
    not_before = integer(doc.get("not_before", t), "not_before", lo=0, hi=t + MAX_DAYS * 86_400)
    expires_at = _expiry(doc, max(t, not_before))
    if expires_at <= not_before:
        raise InvalidInput("expires_at must be after not_before")
    grace = integer(doc.get("offline_grace", cfg.default_offline_grace), "offline_grace",
                    lo=cfg.min_lifetime, hi=cfg.max_offline_grace)
    terms, ttl = _terms(doc, grace)
    code = machine_code(doc["machine"]) if "machine" in doc else ""
    customer = string(doc, "customer", "") if "customer" in doc else ""
    if "customer" in doc and not customer.strip():
        raise InvalidInput("customer must not be empty")
    model_id = check_model_id(doc["model"]) if "model" in doc else ""
    notes = string(doc, "notes", "", max_len=1000)
    svc = services()

    def attempt() -> dict[str, str]:
        guards = Change()
        owner = customer
        if code:
            machine = machines.get(svc.redis, code)
            owner = machine.get("customer", "")
            # issued only if the machine (and its customer) is as just read
            if "customer" in machine:
                guards.guard("eq", machines.key(code), "customer", machine["customer"])
            else:
                guards.guard("present", machines.key(code))
        if model_id:
            if models.get(svc.redis, model_id).get("status") != "active":
                raise Conflict(f"model {model_id} is retired")
            guards.guard("eq", models.key(model_id), "status", "active")
        rec = licenses.record(code, model_id, owner, not_before, expires_at, ttl, grace, notes, terms=terms)
        licenses.create(svc.commits, rec, guards=guards, actor=g.actor, license=rec["license_id"],
                        machine=code or None, customer=owner if not code else None, model=model_id or None,
                        family=terms.get("family"), kind=terms.get("kind"), seats=terms.get("seats"),
                        expires_at=expires_at, not_before=not_before)
        return rec

    rec = until_committed(attempt, what=f"machine {code or '-'} or model {model_id or '-'}")
    metrics.LICENSES_ISSUED.inc()
    return licenses.public_view(rec), 201


@bp.get("")
@require(*READERS)
def list_licenses() -> dict[str, Any]:
    cursor, limit = page_args()
    want = {k: request.args[k] for k in ("machine", "model", "customer", "family") if k in request.args}
    kind = request.args.get("kind")
    if "machine" in want:
        want["machine"] = machine_code(want["machine"])
    status = request.args.get("status")
    t = time.time()

    def keep(rec: dict[str, str]) -> bool:
        return all(rec.get(k) == v for k, v in want.items()) and (
            status is None or licenses.state(rec, t) == status) and (kind is None or licenses.kind_of(rec) == kind)

    recs, nxt = page(services().redis, licenses.ALL, licenses.key, cursor, limit, keep)
    return {"items": [licenses.public_view(r) for r in recs], "next_cursor": nxt}


@bp.get("/<license_id>")
@require(*READERS)
def show(license_id: str) -> dict[str, Any]:
    """The license; a pool license also with its seat usage (``used``, ``holders``)."""
    svc = services()
    rec = licenses.get(svc.redis, license_id)
    view = licenses.public_view(rec)
    if licenses.pooled(rec):
        usage = seats.usage(svc.redis, rec, time.time())
        view.update(used=usage["used"], holders=usage["holders"])
    return view


@bp.get("/<license_id>/seats")
@require(*READERS)
def list_seats(license_id: str) -> dict[str, Any]:
    """Who holds the pool license's seats: ``{seats, used, holders: [{machine, until, live}]}``."""
    svc = services()
    rec = licenses.get(svc.redis, license_id)
    if not licenses.pooled(rec):
        raise InvalidInput(f"license {license_id} is a node license: it has no seats")
    return {"license_id": license_id, **seats.usage(svc.redis, rec, time.time())}


@bp.post("/<license_id>/seats/<code>/release")
@require(*WRITERS)
def release_seat(license_id: str, code: str) -> dict[str, Any]:
    """Free a machine's seat now (audited ``seat_released``); it may take one again when it next activates."""
    doc = body({"reason"})
    reason = string(doc, "reason", "", max_len=500)
    machine = machine_code(code)
    svc = services()
    rec = licenses.get(svc.redis, license_id)
    if not licenses.pooled(rec):
        raise InvalidInput(f"license {license_id} is a node license: it has no seats")
    seats.release(svc.commits, license_id, machine, actor=g.actor, reason=reason)
    return {"license_id": license_id, "machine": machine, "released": True,
            **seats.usage(svc.redis, rec, time.time())}


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

    _, after = licenses.mutate(svc.commits, license_id, change, lambda before, after: (
        "license_revoked", {"license": license_id, "machine": after["machine"] or None,
                            "model": after["model"] or None, "reason": reason}), actor=g.actor)
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

    _, after = licenses.mutate(svc.commits, license_id, change, lambda before, after: (
        "license_extended", {"license": license_id, "machine": after["machine"] or None,
                             "model": after["model"] or None,
                             "old_expires_at": int(before["expires_at"]), "expires_at": int(after["expires_at"])}),
        actor=g.actor)
    return licenses.public_view(after)
