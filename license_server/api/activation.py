"""``POST /v1/activate``: a verifier's signed request in, a license token out.

This module is the I/O around :func:`layerlock.license_server.decision.decide`, which holds
every rule.  Redis round trips for a grant: one read (:class:`~layerlock.license_server.store.
guards.ActivationReader`: counters, machine, model, the pair's licenses, audit head) and one
commit (``AuditLog.commit``, retried only if another append moved the head in between) that
burns the nonce, counts the signed request against the machine, bumps the license's counters
and appends the audit record atomically — and only if the license, machine and model fields
the token was built from are unchanged.  So an activation racing a revocation lands before it
(token issued, revoke audited after) or after it (re-read, denied): one of the serial orders,
never a token for a license already revoked, never a grant without its audit record.

A refusal of a request that proved nothing (see the decision's rules 1-6) costs one pipelined
write of counters (:mod:`layerlock.license_server.store.rejections`) and is not audited; a
replayed nonce makes the commit write nothing and is counted the same way.
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
from layerlock.license_server.decision import Grant, Refusal, decide
from layerlock.license_server.store import guards, licenses, machines, models, rejections
from layerlock.license_server.store.audit import Change, GuardFailed, Replayed
from layerlock.shared.activation import ActivationRequest, parse_request
from layerlock.shared.errors import ActivationDenied, Denial
from layerlock.shared.keys import b64u_decode, b64u_encode, ed25519_public, mlkem768_public, x25519_public
from layerlock.shared.tokens import AUDIENCE, LicenseClaims, sign_token
from layerlock.shared.wrap import binding_info, public_for, seal

bp = Blueprint("activation", __name__)

#: License fields a token is computed from: the grant commits only if none of them changed.
TOKEN_FIELDS = ("status", "not_before", "expires_at", "token_ttl", "offline_grace")
#: Times the read-decide-commit loop starts over because what it read changed meanwhile.
MAX_DECISIONS = 20


# Machines' *public* keys, parsed once per worker (safe to keep: nothing secret).
@functools.lru_cache(maxsize=8192)
def _sig_key(b64: str) -> Ed25519PublicKey:
    return ed25519_public(b64u_decode(b64))


@functools.lru_cache(maxsize=8192)
def _kex_key(b64: str) -> X25519PublicKey:
    return x25519_public(b64u_decode(b64))


@bp.post("/v1/activate")
def activate() -> dict[str, Any]:
    t0 = time.perf_counter()
    req = parse_request(body(("machine", "model", "ts", "nonce", "sig")))
    svc = services()
    ip = client_ip()
    try:
        result = _activate(svc, req, ip)
    except ActivationDenied as denied:
        metrics.ACTIVATIONS.labels(outcome=denied.code).inc()
        raise
    finally:
        metrics.ACTIVATION_SECONDS.observe(time.perf_counter() - t0)
    metrics.GRANTED.inc()
    return result


def _activate(svc: Services, req: ActivationRequest, ip: str) -> dict[str, Any]:
    cfg = svc.config
    nonce_key, nonce_ttl = guards.nonce_key(req.machine, req.nonce), 2 * cfg.clock_skew + 60
    for _ in range(MAX_DECISIONS):
        snap = svc.activation_reader(req.machine, req.model, ip)
        outcome = decide(snap, req, time.time(), cfg, svc.policy, _sig_key)
        change = guards.count_machine(Change().once(nonce_key, nonce_ttl), req.machine)
        try:
            if isinstance(outcome, Refusal):
                _refuse(svc, outcome, change, req, ip, snap.head)
            return _grant(svc, req, snap, outcome, change, ip)
        except Replayed:
            # nothing was written (no grant, no record): a capture replayed, counted only
            rejections.record(svc.redis, ip, Denial.REPLAY)
            raise ActivationDenied(Denial.REPLAY, "this request was already seen") from None
        except GuardFailed:
            continue  # something the decision was based on changed: decide again on fresh data
    raise ActivationDenied(Denial.BUSY, "the license is changing too fast; retry shortly")


def _refuse(svc: Services, refusal: Refusal, change: Change, req: ActivationRequest, ip: str, head: str) -> None:
    if not refusal.audited:
        if refusal.reason == Denial.RATE_LIMITED:
            rejections.count_only(refusal.reason)  # over budget: not even a counter write
        else:
            rejections.record(svc.redis, ip, refusal.reason)
        raise refusal.error()
    svc.audit.commit("activation", change, head=head, machine=req.machine, model=req.model, outcome="denied",
                     reason=str(refusal.reason), ip=ip)
    raise refusal.error()


def _grant(svc: Services, req: ActivationRequest, snap: guards.Snapshot, grant: Grant, change: Change,
           ip: str) -> dict[str, Any]:
    lic = grant.license
    iat, token, jti = _token(svc, req, snap.machine, snap.model, lic, grant.suite)
    lkey, mkey = licenses.key(lic["license_id"]), machines.key(req.machine)
    for f in TOKEN_FIELDS:
        change.guard("eq", lkey, f, lic[f]) if f in lic else change.guard("nofield", lkey, f)
    change.guard("eq", mkey, "status", "active").guard("eq", mkey, "sig_pub", snap.machine["sig_pub"])
    change.guard("eq", models.key(req.model), "status", "active")
    change.write("HINCRBY", lkey, "activations", 1).hset(lkey, {"last_activation": str(iat)})
    # head=None: read the chain head now, not the one from the snapshot — the crypto above
    # took long enough for other workers to append, and each stale guess costs a retry
    svc.audit.commit("activation", change, head=None, machine=req.machine, model=req.model, outcome="granted",
                     license=lic["license_id"], suite=grant.suite, jti=jti, ip=ip)
    return token


def _token(svc: Services, req: ActivationRequest, mrec: dict[str, str], model: dict[str, str],
           lic: dict[str, str], suite: str) -> tuple[int, dict[str, Any], str]:
    iat = int(time.time())
    exp = min(iat + int(lic["offline_grace"]), int(lic["expires_at"]))
    rna = min(iat + (2 * int(lic["token_ttl"])) // 3, exp)
    pq = mlkem768_public(b64u_decode(mrec["pq_pub"])) if "pq_pub" in mrec else None
    recipient = public_for(suite, _kex_key(mrec["kex_pub"]), pq)
    data_key = svc.keys.open_data_key(model["wrapped_key"], model["kek_id"], req.model)
    wk = seal(data_key, recipient, suite, binding_info(lic["license_id"], req.machine, req.model))
    jti = secrets.token_hex(12)
    claims = LicenseClaims(iss=svc.config.issuer, aud=AUDIENCE, sub=req.machine, lic=lic["license_id"],
                           mdl=req.model, iat=iat, nbf=iat, exp=exp, jti=jti, wk=b64u_encode(wk),
                           suite=suite, rna=rna)
    token = sign_token(claims, svc.keys.keys.signing)
    return iat, {"token": token, "expires_at": exp, "renew_at": rna, "license_id": lic["license_id"]}, jti
