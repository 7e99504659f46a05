"""``/v1/audit``: filtered, cursor-paginated audit records (newest first), and chain verification."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, request

from layerlock.license_server.api.common import integer, machine_code, require
from layerlock.license_server.app import services
from layerlock.shared.errors import InvalidInput

bp = Blueprint("audit", __name__, url_prefix="/v1/audit")
AUDITORS = ("admin", "auditor")


def _time(name: str) -> float | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        raise InvalidInput(f"{name} must be Unix seconds") from None


@bp.get("")
@require(*AUDITORS)
def list_records() -> dict[str, Any]:
    limit = integer(request.args.get("limit", "100"), "limit", lo=1, hi=1000)
    cursor = request.args.get("cursor") or None
    if cursor is not None and not all(part.isdigit() for part in cursor.split("-", 1)):
        raise InvalidInput("cursor must be an audit record id")
    filters = {k: request.args[k] for k in ("type", "machine", "license", "model", "outcome", "reason")
               if k in request.args}
    if "machine" in filters:
        filters["machine"] = machine_code(filters["machine"])
    items, nxt = services().audit.list(cursor=cursor, limit=limit, filters=filters,
                                       since=_time("since"), until=_time("until"))
    return {"items": items, "next_cursor": nxt}


@bp.get("/verify")
@require(*AUDITORS)
def verify() -> dict[str, Any]:
    return services().audit.verify()
