"""``POST /v1/enroll``: a host redeems the claim ops gave it and its keys are bound.

Public (no API key): the claim secret is the credential.  A failure that proves nothing (an
unknown secret, a malformed or unsigned enrollment code) is counted against its source, never
audited; refusals of a real claim (used, expired, superseded, for another machine) are audited
by :func:`layerlock.license_server.store.claims.redeem`.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from layerlock.license_server.api.common import body, client_ip, now
from layerlock.license_server.app import services
from layerlock.license_server.store import claims, machines, rejections
from layerlock.shared.enrollment import parse_code
from layerlock.shared.errors import ActivationDenied, ClaimRefused, Denial, InvalidInput, LayerlockError

bp = Blueprint("enroll", __name__)


@bp.post("/v1/enroll")
def enroll() -> dict[str, Any]:
    """Public: a host binds its keys with its enrollment code and the claim ops gave it."""
    doc = body({"enrollment", "claim"}, required=("enrollment", "claim"))
    secret = doc["claim"]
    if not isinstance(secret, str) or not secret.startswith(claims.PREFIX) or len(secret) > 100:
        raise InvalidInput(f"claim must be the {claims.PREFIX}… secret ops created for this machine")
    svc = services()
    ip = client_ip()
    try:
        enrollment = parse_code(doc["enrollment"])
        return machines.public_view(claims.redeem(svc.commits, secret, enrollment, now=now(), ip=ip))
    except (ClaimRefused, LayerlockError) as exc:
        if isinstance(exc, ClaimRefused) and exc.code != "bad_claim":
            raise  # a real claim, refused and audited by redeem()
        _count_failure(svc, ip, exc.code)
        raise


def _count_failure(svc: Any, ip: str, reason: str) -> None:
    """A failure that proved nothing: counted; past the source's budget, refused unheard."""
    if int(svc.redis.get(rejections.failure_key(ip)) or 0) >= svc.config.rate_unauth_per_min:
        rejections.count_only(Denial.RATE_LIMITED)
        raise ActivationDenied(Denial.RATE_LIMITED, "too many failed requests from this address; slow down")
    rejections.record(svc.redis, ip, reason)
