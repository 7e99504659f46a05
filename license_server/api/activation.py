"""``POST /v1/activate``: a verifier's signed request in, a license token out.

Order of checks is chosen so a denied request costs little and reveals nothing: shape first (a
malformed body is a 400, not audited), then rate limits, clock skew, machine, signature (before
the nonce is burnt, so nobody can burn a machine's nonces without its key), nonce, model,
license.

Redis round trips for a grant: one read (:class:`~layerlock.license_server.store.guards.ActivationReader`:
rate-limit hits, machine, model, the pair's licenses, audit head), then a read of the chain head
and one commit (``AuditLog.commit``, retried only if another append moved the head in between)
that burns the nonce, counts the activation and appends the audit record atomically — and only
if the license, machine and model fields the token was built from are unchanged. So an
activation racing a revocation lands before it (token issued, revoke audited after) or after it
(re-read, denied): one of the serial orders, never a token for a license already revoked, never
a grant without its audit record. A replayed nonce makes the commit write nothing; only the
``replay`` denial is audited.
"""

from __future__ import annotations

import functools
import secrets
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from flask import Blueprint

from layerlock.license_server import metrics
from layerlock.license_server.api.common import body, client_ip
from layerlock.license_server.app import Services, services
from layerlock.license_server.store import guards, licenses, machines, models
from layerlock.license_server.store.audit import Change, GuardFailed, Replayed
from layerlock.shared.activation import ActivationRequest, parse_request, verify_signature
from layerlock.shared.enrollment import Enrollment, parse_code
from layerlock.shared.errors import ActivationDenied, LayerlockError
from layerlock.shared.keys import b64u_decode, b64u_encode, ed25519_public, mlkem768_public, x25519_public
from layerlock.shared.tokens import AUDIENCE, LicenseClaims, sign_token
from layerlock.shared.wrap import binding_info, public_for, seal

bp = Blueprint("activation", __name__)

#: License fields a token is computed from: the grant commits only if none of them changed.
TOKEN_FIELDS = ("status", "not_before", "expires_at", "token_ttl", "offline_grace")


# Machines' *public* keys, parsed once per worker (safe to keep: nothing secret).
@functools.lru_cache(maxsize=8192)
def _sig_key(b64: str) -> Ed25519PublicKey:
    return ed25519_public(b64u_decode(b64))


@functools.lru_cache(maxsize=8192)
def _kex_key(b64: str) -> X25519PublicKey:
    return x25519_public(b64u_decode(b64))


class _Audited(ActivationDenied):
    """A denial whose audit record is already committed (with the nonce)."""


@bp.post("/v1/activate")
def activate() -> dict[str, Any]:
    t0 = time.perf_counter()
    doc = body(("machine", "model", "ts", "nonce", "sig", "enrollment"))
    enrollment = doc.pop("enrollment", None)
    req = parse_request(doc)
    svc = services()
    ip = client_ip()
    head: list[str | None] = [None]
    try:
        result = _activate(svc, req, enrollment, ip, head)
    except ActivationDenied as denied:
        metrics.ACTIVATIONS.labels(outcome=denied.code).inc()
        if not isinstance(denied, _Audited):
            svc.audit.append("activation", head=head[0], machine=req.machine, model=req.model, outcome="denied",
                             reason=denied.code, ip=ip)
        raise
    finally:
        metrics.ACTIVATION_SECONDS.observe(time.perf_counter() - t0)
    metrics.GRANTED.inc()
    return result


def _activate(svc: Services, req: ActivationRequest, enrollment: Any, ip: str,
              head: list[str | None]) -> dict[str, Any]:
    cfg = svc.config
    nonce_key, nonce_ttl = guards.nonce_key(req.machine, req.nonce), 2 * cfg.clock_skew + 60
    burnt = False  # the TOFU commit already burnt the nonce
    for _ in range(20):
        snap = svc.activation_reader(req.machine, req.model, ip)
        head[0] = snap.head
        tofu = _check_caller(svc, req, snap, enrollment)
        mkey = machines.key(req.machine)
        try:
            if tofu is not None:
                # bind the key from the enrollment code, burn the nonce, audit: one commit
                change = (Change().guard("nofield", mkey, "sig_pub").hset(mkey, machines.enrollment_fields(tofu))
                          .once(nonce_key, nonce_ttl))
                svc.audit.commit("tofu_bind", change, head=snap.head, machine=req.machine, ip=ip)
                burnt = True
                continue  # read again: the machine now has its key
            change = Change() if burnt else Change().once(nonce_key, nonce_ttl)
            try:
                lic = _license(snap, time.time())
            except ActivationDenied as denied:
                svc.audit.commit("activation", change, head=snap.head, machine=req.machine, model=req.model,
                                 outcome="denied", reason=denied.code, ip=ip)
                raise _Audited(denied.code, str(denied)) from None
            result, suite, jti = _token(svc, req, snap.machine, snap.model, lic)
            lkey = licenses.key(lic["license_id"])
            for f in TOKEN_FIELDS:
                change.guard("eq", lkey, f, lic[f]) if f in lic else change.guard("nofield", lkey, f)
            change.guard("eq", mkey, "status", "active").guard("eq", mkey, "sig_pub", snap.machine["sig_pub"])
            change.guard("eq", models.key(req.model), "status", "active")
            change.write("HINCRBY", lkey, "activations", 1).hset(lkey, {"last_activation": str(result["_iat"])})
            # head=None: read the chain head now, not the one from the snapshot — the crypto above
            # took long enough for other workers to append, and each stale guess costs a retry
            svc.audit.commit("activation", change, head=None, machine=req.machine, model=req.model,
                             outcome="granted", license=lic["license_id"], suite=suite, jti=jti, ip=ip)
            del result["_iat"]
            return result
        except Replayed:
            # nothing was written (no grant, no bind); the denial is audited by the caller
            raise ActivationDenied("replay", "this request was already seen") from None
        except GuardFailed:
            continue  # something the decision was based on changed: decide again on fresh data
    raise ActivationDenied("rate_limited", "license is changing too fast; retry")


def _check_caller(svc: Services, req: ActivationRequest, snap: guards.Snapshot,
                  enrollment: Any) -> Enrollment | None:
    """Rate limits, clock skew, machine, signature; returns the enrollment to bind (TOFU) if any."""
    cfg = svc.config
    if snap.machine_hits > cfg.rate_machine_per_min or snap.ip_hits > cfg.rate_ip_per_min:
        raise ActivationDenied("rate_limited", "too many activation requests; slow down")
    if abs(time.time() - req.ts) > cfg.clock_skew:
        raise ActivationDenied("stale_request", f"request time is more than {cfg.clock_skew}s off the server clock")
    mrec = snap.machine
    if not mrec:
        raise ActivationDenied("unknown_machine", "this machine is not registered")
    if mrec.get("status") != "active":
        raise ActivationDenied("machine_inactive", "this machine has been deactivated")
    tofu = None
    sig_pub = mrec.get("sig_pub")
    if sig_pub is None:
        if not isinstance(enrollment, str):
            raise ActivationDenied("bad_signature", "machine has no key on file: send its enrollment code")
        try:
            tofu = parse_code(enrollment)
        except LayerlockError:
            raise ActivationDenied("bad_signature", "enrollment code does not verify") from None
        if tofu.machine != req.machine:
            raise ActivationDenied("bad_signature", "enrollment code belongs to another machine")
        sig_pub = machines.enrollment_fields(tofu)["sig_pub"]
    try:
        verify_signature(req, _sig_key(sig_pub))
    except LayerlockError:
        raise ActivationDenied("bad_signature", "request signature does not verify with the machine key") from None
    return tofu


def _license(snap: guards.Snapshot, t: float) -> dict[str, str]:
    """The model must be active; then the active license that lasts longest, or why there is none."""
    if not snap.model or snap.model.get("status") != "active":
        raise ActivationDenied("unknown_model", "this model is not registered (or retired)")
    recs = snap.licenses
    states = {rec["license_id"]: licenses.state(rec, t) for rec in recs}
    active = [rec for rec in recs if states[rec["license_id"]] == "active"]
    if active:
        return max(active, key=lambda rec: int(rec["expires_at"]))
    if not recs or "pending" in states.values():
        raise ActivationDenied("no_license", "no valid license for this machine and model")
    if "expired" in states.values():
        raise ActivationDenied("expired", "the license has expired")
    raise ActivationDenied("revoked", "the license has been revoked")


def _token(svc: Services, req: ActivationRequest, mrec: dict[str, str], model: dict[str, str],
           lic: dict[str, str]) -> tuple[dict[str, Any], str, str]:
    iat = int(time.time())
    exp = min(iat + int(lic["offline_grace"]), int(lic["expires_at"]))
    rna = min(iat + (2 * int(lic["token_ttl"])) // 3, exp)
    has_pq = "pq_pub" in mrec
    suite = svc.policy.choose(machines.device_of(mrec), has_pq)
    recipient = public_for(suite, _kex_key(mrec["kex_pub"]), mlkem768_public(b64u_decode(mrec["pq_pub"])) if has_pq
                           else None)
    data_key = svc.keys.open_data_key(model["wrapped_key"], model["kek_id"], req.model)
    wk = seal(data_key, recipient, suite, binding_info(lic["license_id"], req.machine, req.model))
    jti = secrets.token_hex(12)
    claims = LicenseClaims(iss=svc.config.issuer, aud=AUDIENCE, sub=req.machine, lic=lic["license_id"],
                           mdl=req.model, iat=iat, nbf=iat, exp=exp, jti=jti, wk=b64u_encode(wk),
                           suite=suite, rna=rna)
    token = sign_token(claims, svc.keys.keys.signing)
    return ({"token": token, "expires_at": exp, "renew_at": rna, "license_id": lic["license_id"], "_iat": iat},
            suite, jti)
