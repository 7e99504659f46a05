"""``/v1/models``: register a protected model with its sealed data key; list, show, retire.

The data key arrives sealed to the server's intake key (``layerlock protect``), is opened here
only long enough to re-seal it under the KEK, and is never returned by any endpoint.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g, request

from layerlock.license_server.api.common import READERS, WRITERS, body, page_args, require, string
from layerlock.license_server.app import services
from layerlock.license_server.store import models, page
from layerlock.shared.activation import check_model_id
from layerlock.shared.keys import b64u_encode
from layerlock.shared.wrap import open_from_vendor

bp = Blueprint("models", __name__)


@bp.get("/v1/intake-key")
@require(*WRITERS)
def intake_key() -> dict[str, str]:
    return {"intake_pub": b64u_encode(services().keys.keys.intake.public_key().public_bytes_raw())}


@bp.post("/v1/models")
@require(*WRITERS)
def register() -> tuple[dict[str, Any], int]:
    doc = body({"model_id", "name", "version", "sealed_key"}, required=("model_id", "sealed_key"))
    model_id = check_model_id(doc["model_id"], field="model_id")
    name, version = string(doc, "name", model_id), string(doc, "version", "")
    svc = services()
    data_key = open_from_vendor(doc["sealed_key"], svc.keys.keys.intake, model_id)
    wrapped, kek_id = svc.keys.seal_data_key(data_key, model_id)
    rec = models.record(model_id, name, version, wrapped, kek_id)
    models.create(svc.audit, rec, actor=g.actor, model=model_id, version=version, kek_id=kek_id)
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
    return models.public_view(models.retire(services().audit, model_id, actor=g.actor))
