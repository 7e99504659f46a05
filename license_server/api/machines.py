"""``/v1/machines``: register, claim, list, update, deactivate.

A machine registered with its enrollment code has its keys at once.  One registered by its
bare machine code has none, and gets them only through a claim ops create here
(``POST /v1/machines/<code>/claims``, the secret shown once) and the host presents with its
enrollment code (``POST /v1/enroll``).  See :mod:`layerlock.license_server.store.claims`."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, g, request

from layerlock.license_server.api.common import (
    body,
    integer,
    labels,
    machine_code,
    page_args,
    require,
    string,
)
from layerlock.license_server.app import services
from layerlock.license_server.config import MAX_CLAIM_TTL
from layerlock.license_server.roles import READERS, WRITERS
from layerlock.license_server.store import claims, dumps, machines, page
from layerlock.shared.enrollment import parse_code
from layerlock.shared.errors import Conflict, InvalidInput

bp = Blueprint("machines", __name__, url_prefix="/v1/machines")


@bp.post("")
@require(*WRITERS)
def register() -> tuple[dict[str, Any], int]:
    doc = body({"machine", "customer", "labels", "enrollment"})
    enrollment = parse_code(doc["enrollment"]) if "enrollment" in doc else None
    if "machine" in doc:
        code = machine_code(doc["machine"])
    elif enrollment is not None:
        code = enrollment.machine
    else:
        raise InvalidInput("give the machine code (machine) or the enrollment code (enrollment)")
    if enrollment is not None and enrollment.machine != code:
        raise InvalidInput("the enrollment code belongs to another machine code")
    rec = machines.record(code, string(doc, "customer", ""), labels(doc.get("labels", {})), enrollment)
    machines.create(services().commits, rec, actor=g.actor, machine=code, customer=rec["customer"],
                    enrolled=enrollment is not None)
    return machines.public_view(rec), 201


@bp.get("")
@require(*READERS)
def list_machines() -> dict[str, Any]:
    cursor, limit = page_args()
    customer, status, label = (request.args.get(k) for k in ("customer", "status", "label"))
    lk, _, lv = (label or "").partition("=")

    def keep(rec: dict[str, str]) -> bool:
        if customer is not None and rec.get("customer") != customer:
            return False
        if status is not None and rec.get("status") != status:
            return False
        if label:
            lab = json.loads(rec.get("labels", "{}"))
            return lk in lab and (not lv or lab[lk] == lv)
        return True

    recs, nxt = page(services().redis, machines.ALL, machines.key, cursor, limit, keep)
    return {"items": [machines.public_view(r) for r in recs], "next_cursor": nxt}


@bp.get("/<code>")
@require(*READERS)
def show(code: str) -> dict[str, Any]:
    return machines.public_view(machines.get(services().redis, machine_code(code)))


@bp.patch("/<code>")
@require(*WRITERS)
def update(code: str) -> dict[str, Any]:
    code = machine_code(code)
    doc = body({"labels", "customer"})
    fields: dict[str, str] = {}
    if "labels" in doc:
        fields["labels"] = dumps(labels(doc["labels"]))
    if "customer" in doc:
        fields["customer"] = string(doc, "customer")
    if not fields:
        raise InvalidInput("nothing to update: give labels and/or customer")
    rec = machines.update(services().commits, code, lambda _: fields, "machine_updated", actor=g.actor,
                          machine=code, fields=sorted(fields))
    return machines.public_view(rec)


def _set_status(code: str, status: str, event: str) -> dict[str, Any]:
    code = machine_code(code)
    body(())

    def change(rec: dict[str, str]) -> dict[str, str]:
        if rec.get("status") == status:
            raise Conflict(f"machine {code} is already {status}")
        return {"status": status}

    rec = machines.update(services().commits, code, change, event, actor=g.actor, machine=code)
    return machines.public_view(rec)


@bp.post("/<code>/deactivate")
@require(*WRITERS)
def deactivate(code: str) -> dict[str, Any]:
    return _set_status(code, "inactive", "machine_deactivated")


@bp.post("/<code>/reactivate")
@require(*WRITERS)
def reactivate(code: str) -> dict[str, Any]:
    return _set_status(code, "active", "machine_reactivated")


@bp.post("/<code>/claims")
@require(*WRITERS)
def create_claim(code: str) -> tuple[dict[str, Any], int]:
    code = machine_code(code)
    doc = body({"ttl"})
    svc = services()
    ttl = integer(doc.get("ttl", svc.config.default_claim_ttl), "ttl", lo=svc.config.min_lifetime, hi=MAX_CLAIM_TTL)
    return claims.create(svc.commits, code, ttl, actor=g.actor), 201

