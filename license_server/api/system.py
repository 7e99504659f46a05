"""Probes, metrics, JWKS, the OpenAPI document and its browsable page, and ``/v1/ping``."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response

from layerlock.license_server import metrics
from layerlock.license_server.app import services
from layerlock.license_server.openapi import DOCS_HTML, document
from layerlock.license_server.redis_conn import REDIS_DOWN
from layerlock.shared.errors import Unavailable
from layerlock.shared.tokens import jwks

bp = Blueprint("system", __name__)


@bp.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> dict[str, Any]:
    svc = services()
    try:
        svc.redis.ping()
        svc.ensure_bootstrap()
    except REDIS_DOWN:
        raise Unavailable("redis is unreachable") from None
    return {"status": "ready", "kid": svc.keys.current.kid}


@bp.get("/v1/ping")
def ping() -> dict[str, bool]:
    return {"pong": True}


@bp.get("/.well-known/jwks.json")
def jwks_document() -> Response:
    keys = services().keys.current
    resp = Response(_json(jwks(list(keys.published), keys.endorsements)), mimetype="application/json")
    resp.headers["Cache-Control"] = "public, max-age=300"
    return resp


@bp.get("/metrics")
def metrics_page() -> Response:
    data, ctype = metrics.render()
    return Response(data, content_type=ctype)


@bp.get("/openapi.json")
def openapi() -> dict[str, Any]:
    return document()


@bp.get("/docs")
def docs() -> Response:
    return Response(DOCS_HTML, mimetype="text/html")


def _json(doc: Any) -> str:
    import json

    return json.dumps(doc)
