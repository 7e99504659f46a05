"""``POST /v1/activate``: a verifier's signed request in, a license token out.

Order of checks is chosen so a denied request costs little and reveals nothing: shape first (a
malformed body is a 400, not audited), then rate limits, clock skew, machine, signature (before
the nonce is burnt, so nobody can burn a machine's nonces without its key), nonce, model,
license.  The grant commits in a transaction that WATCHes the license, so an activation racing a
revocation lands before it (token issued, revoke audited after) or after it (denied): one of the
serial orders, never a token for a license already revoked.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import redis
from flask import Blueprint

from license_server import metrics
from license_server.api.common import body, client_ip
from license_server.app import Services, services
from license_server.store import guards, licenses, machines, models
from shared.activation import ActivationRequest, parse_request, verify_signature
from shared.enrollment import parse_code
from shared.errors import ActivationDenied, LayerlockError
from shared.keys import b64u_decode, b64u_encode, ed25519_public, mlkem768_public, x25519_public
from shared.tokens import AUDIENCE, LicenseClaims, sign_token
from shared.wrap import binding_info, public_for, seal

bp = Blueprint("activation", __name__)


@bp.post("/v1/activate")
def activate() -> dict[str, Any]:
    t0 = time.perf_counter()
    doc = body(("machine", "model", "ts", "nonce", "sig", "enrollment"))
    enrollment = doc.pop("enrollment", None)
    req = parse_request(doc)
    svc = services()
    try:
        result = _grant(svc, req, enrollment)
    except ActivationDenied as denied:
        metrics.ACTIVATIONS.labels(outcome=denied.code).inc()
        svc.audit.append("activation", machine=req.machine, model=req.model, outcome="denied",
                         reason=denied.code, ip=client_ip())
        raise
    finally:
        metrics.ACTIVATION_SECONDS.observe(time.perf_counter() - t0)
    metrics.ACTIVATIONS.labels(outcome="granted").inc()
    svc.audit.append("activation", machine=req.machine, model=req.model, outcome="granted",
                     license=result["license_id"], suite=result.pop("_suite"), jti=result.pop("_jti"),
                     ip=client_ip())
    return result


def _grant(svc: Services, req: ActivationRequest, enrollment: Any) -> dict[str, Any]:
    cfg, r = svc.config, svc.redis
    over = guards.within_limits(r, [("m", req.machine, cfg.rate_machine_per_min),
                                    ("ip", client_ip(), cfg.rate_ip_per_min)])
    if over:
        raise ActivationDenied("rate_limited", "too many activation requests; slow down")
    if abs(time.time() - req.ts) > cfg.clock_skew:
        raise ActivationDenied("stale_request", f"request time is more than {cfg.clock_skew}s off the server clock")
    mrec = r.hgetall(machines.key(req.machine))
    if not mrec:
        raise ActivationDenied("unknown_machine", "this machine is not registered")
    if mrec.get("status") != "active":
        raise ActivationDenied("machine_inactive", "this machine has been deactivated")
    tofu = None
    if "sig_pub" not in mrec:
        if not isinstance(enrollment, str):
            raise ActivationDenied("bad_signature", "machine has no key on file: send its enrollment code")
        try:
            tofu = parse_code(enrollment)
        except LayerlockError:
            raise ActivationDenied("bad_signature", "enrollment code does not verify") from None
        if tofu.machine != req.machine:
            raise ActivationDenied("bad_signature", "enrollment code belongs to another machine")
        mrec.update(machines.enrollment_fields(tofu))
    try:
        verify_signature(req, ed25519_public(b64u_decode(mrec["sig_pub"])))
    except LayerlockError:
        raise ActivationDenied("bad_signature", "request signature does not verify with the machine key") from None
    if not guards.nonce_fresh(r, req.machine, req.nonce, 2 * cfg.clock_skew + 60):
        raise ActivationDenied("replay", "this request was already seen")
    if tofu is not None and machines.bind_tofu(r, req.machine, tofu):
        svc.audit.append("tofu_bind", machine=req.machine, ip=client_ip())
    model = r.hgetall(models.key(req.model))
    if not model or model.get("status") != "active":
        raise ActivationDenied("unknown_model", "this model is not registered (or retired)")
    for _ in range(20):
        try:
            return _issue(svc, req, mrec, model)
        except redis.WatchError:
            continue
    raise ActivationDenied("rate_limited", "license is changing too fast; retry")


def _pick(recs: list[dict[str, str]], t: float) -> dict[str, str]:
    states = {rec["license_id"]: licenses.state(rec, t) for rec in recs}
    active = [rec for rec in recs if states[rec["license_id"]] == "active"]
    if active:
        return max(active, key=lambda rec: int(rec["expires_at"]))
    if not recs or "pending" in states.values():
        raise ActivationDenied("no_license", "no valid license for this machine and model")
    if "expired" in states.values():
        raise ActivationDenied("expired", "the license has expired")
    raise ActivationDenied("revoked", "the license has been revoked")


def _issue(svc: Services, req: ActivationRequest, mrec: dict[str, str], model: dict[str, str]) -> dict[str, Any]:
    r = svc.redis
    lic = _pick(licenses.for_pair(r, req.machine, req.model), time.time())
    lkey = licenses.key(lic["license_id"])
    with r.pipeline() as pipe:
        pipe.watch(lkey)
        lic = pipe.hgetall(lkey)
        t = time.time()
        lic = _pick([lic], t) if lic else _pick([], t)
        iat = int(t)
        exp = min(iat + int(lic["offline_grace"]), int(lic["expires_at"]))
        rna = min(iat + (2 * int(lic["token_ttl"])) // 3, exp)
        has_pq = "pq_pub" in mrec
        suite = svc.policy.choose(machines.device_of(mrec), has_pq)
        recipient = public_for(suite, x25519_public(b64u_decode(mrec["kex_pub"])),
                               mlkem768_public(b64u_decode(mrec["pq_pub"])) if has_pq else None)
        data_key = svc.keys.open_data_key(model["wrapped_key"], model["kek_id"], req.model)
        wk = seal(data_key, recipient, suite, binding_info(lic["license_id"], req.machine, req.model))
        jti = secrets.token_hex(12)
        claims = LicenseClaims(iss=svc.config.issuer, aud=AUDIENCE, sub=req.machine, lic=lic["license_id"],
                               mdl=req.model, iat=iat, nbf=iat, exp=exp, jti=jti, wk=b64u_encode(wk),
                               suite=suite, rna=rna)
        token = sign_token(claims, svc.keys.keys.signing)
        pipe.multi()
        pipe.hincrby(lkey, "activations", 1)
        pipe.hset(lkey, "last_activation", str(iat))
        pipe.execute()
    return {"token": token, "expires_at": exp, "renew_at": rna, "license_id": lic["license_id"],
            "_suite": suite, "_jti": jti}
