"""``/v1/models``: register a protected model with its sealed data key; list, show, retire.

A model may be a version of a ``family`` (``family`` + ``version``; ``released_at`` defaults to
the registration time), which family licenses name instead of one model id.

The data key arrives sealed to the server's intake key (``layerlock protect``), is opened here
only long enough to re-seal it under the KEK, and is never returned by any endpoint.  So does a
fingerprinted model's fingerprint secret (kept apart: :mod:`layerlock.license_server.store.models`).
"""

from __future__ import annotations

import hashlib
from typing import Any

from flask import Blueprint, g, request

from layerlock.license_server.api.common import body, integer, page_args, require, string
from layerlock.license_server.app import services
from layerlock.license_server.roles import READERS, WRITERS
from layerlock.license_server.store import models, page
from layerlock.shared.errors import InvalidInput
from layerlock.shared.fingerprint import Secret
from layerlock.shared.ids import check_model_id
from layerlock.shared.keys import b64u_encode
from layerlock.shared.wrap import open_fingerprint_from_vendor, open_from_vendor

bp = Blueprint("models", __name__)


@bp.get("/v1/intake-key")
@require(*WRITERS)
def intake_key() -> dict[str, str]:
    return {"intake_pub": b64u_encode(services().keys.current.intake.public_key().public_bytes_raw())}


@bp.post("/v1/models")
@require(*WRITERS)
def register() -> tuple[dict[str, Any], int]:
    doc = body({"model_id", "name", "version", "family", "released_at", "sealed_key"},
               required=("model_id", "sealed_key"), limit=services().config.max_model_body_bytes)
    model_id = check_model_id(doc["model_id"], field="model_id")
    name, version = string(doc, "name", model_id), string(doc, "version", "")
    family = check_model_id(doc["family"], field="family") if doc.get("family") is not None else ""
    if family and not version:
        raise InvalidInput("a model of a family needs its version")
    released = integer(doc["released_at"], "released_at", lo=0, hi=2**40) if "released_at" in doc else None
    svc = services()
    data_key = open_from_vendor(doc["sealed_key"], svc.keys.current.intake, model_id)
    wrapped, kek_id = svc.keys.seal_data_key(data_key, model_id)
    raw_fp = open_fingerprint_from_vendor(doc["sealed_key"], svc.keys.current.intake, model_id)
    sealed_fp, positions, digest = None, 0, ""
    if raw_fp is not None:
        secret = Secret.from_bytes(raw_fp)  # checked now: a bad one would only fail at activation
        if secret.model_id != model_id:
            raise InvalidInput("the sealed fingerprint belongs to another model id")
        sealed_fp, _ = svc.keys.seal_data_key(raw_fp, model_id + models.FP_BINDING)
        positions, digest = secret.n, hashlib.sha256(sealed_fp.encode()).hexdigest()[:24]
    rec = models.record(model_id, name, version, wrapped, kek_id, family=family, released_at=released,
                        fp_positions=positions, fp_digest=digest)
    models.create(svc.commits, rec, actor=g.actor, fingerprint=sealed_fp, model=model_id, version=version,
                  kek_id=kek_id, family=family or None, fingerprint_positions=positions or None)
    return models.public_view(rec), 201


@bp.get("/v1/models")
@require(*READERS)
def list_models() -> dict[str, Any]:
    cursor, limit = page_args()
    status = request.args.get("status")
    recs, nxt = page(services().redis, models.ALL, models.key, cursor, limit,
                     lambda r: status is None or r.get("status") == status)
    return {"items": [models.public_view(r) for r in recs], "next_cursor": nxt}


@bp.get("/v1/models/<model_id>")
@require(*READERS)
def show(model_id: str) -> dict[str, Any]:
    return models.public_view(models.get(services().redis, check_model_id(model_id)))


@bp.post("/v1/models/<model_id>/retire")
@require(*WRITERS)
def retire(model_id: str) -> dict[str, Any]:
    model_id = check_model_id(model_id)
    body(())
    return models.public_view(models.retire(services().commits, model_id, actor=g.actor))
