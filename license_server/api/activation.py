"""``POST /v1/activate``: a verifier's signed request in, a license token out.

This module is the I/O around :func:`layerlock.license_server.decision.decide`, which holds
every rule.  Redis round trips for a grant: one read (:class:`~layerlock.license_server.store.
guards.ActivationReader`: counters, machine, model, the pair's licenses, audit head) and one
commit (:class:`~layerlock.license_server.store.commit.Commits`) that
burns the nonce, counts the signed request against the machine, bumps the license's counters
and appends the audit record atomically — and only if the license, machine and model fields
the token was built from are unchanged.  So an activation racing a revocation lands before it
(token issued, revoke audited after) or after it (re-read, denied): one of the serial orders,
never a token for a license already revoked, never a grant without its audit record.

A refusal of a request that proved nothing (see the decision's rules 1-6) costs one pipelined
write of counters (:mod:`layerlock.license_server.store.rejections`) and is not audited; a
replayed nonce makes the commit write nothing and is counted the same way.

A grant under a pool license takes (or renews) the machine's seat in that same commit, under a
guard that re-counts the live seats (:func:`layerlock.license_server.store.seats.take`): still one
read and one commit.  Its token never outlives the lease.

``POST /v1/activate/offline`` is the air-gapped path: ops submit the request file a site's
sidecar wrote (``layerlock-verifier request``) with an API key; the same decision (a request up
to ``offline_request_ttl`` old), the same commit, the same sealed and signed token, whose ``jti``
is the request's nonce (so the site's ``import`` knows which request it answers); the nonce is
burnt, so a request file is answered once.  Every outcome is audited (the submitter is a
principal), with ``channel: offline`` and the submitting key as actor.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import time
from typing import Any, NoReturn

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from flask import Blueprint, g

from layerlock.license_server import metrics
from layerlock.license_server.api.common import body, client_ip, require
from layerlock.license_server.app import Services, services
from layerlock.license_server.decision import Grant, Refusal, decide
from layerlock.license_server.fingerprints import secret_for
from layerlock.license_server.roles import WRITERS
from layerlock.license_server.store import guards, licenses, machines, models, rejections, seats
from layerlock.license_server.store.commit import Change, Replayed, until_committed
from layerlock.shared.activation import ActivationRequest, parse_request
from layerlock.shared.errors import ActivationDenied, Conflict, Denial, InvalidInput
from layerlock.shared.fingerprint import license_values
from layerlock.shared.keys import b64u_decode, b64u_encode, ed25519_public, mlkem768_public, x25519_public
from layerlock.shared.tokens import AUDIENCE, LicenseClaims, jwks, sign_token
from layerlock.shared.wrap import binding_info, public_for, seal

bp = Blueprint("activation", __name__)

#: License fields a token is computed from that can change (revoke, extend): the grant commits
#: only if none of them changed.  The other terms (kind, seats, lease, family rule) never change.
TOKEN_FIELDS = ("status", "not_before", "expires_at", "token_ttl", "offline_grace")
#: The air-gapped exchange's file formats (``layerlock-verifier request`` / ``import``).
OFFLINE_REQUEST, OFFLINE_RESPONSE = "offline-request", "offline-response"
#: Sealed data keys for (license, machine, model, suite, recipient keys) that cannot live in the
#: license hash (pool and family licenses serve many machines or models): per worker, bounded.
_WK_CACHE: dict[tuple[str, str, str, str, str], str] = {}
_WK_CACHE_MAX = 4096


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


@bp.post("/v1/activate/offline")
@require(*WRITERS)
def activate_offline() -> dict[str, Any]:
    """The air-gapped exchange: a request file in, a response file (the same token) out."""
    doc = body(("layerlock", "v", "request"), required=("layerlock", "v", "request"))
    if doc["layerlock"] != OFFLINE_REQUEST or type(doc["v"]) is not int or doc["v"] != 1:
        raise InvalidInput(f"not an offline activation request file (layerlock: {OFFLINE_REQUEST!r}, v: 1)")
    req = parse_request(doc["request"])
    try:
        result = _activate(services(), req, client_ip(), offline=True, actor=g.actor)
    except ActivationDenied as denied:
        metrics.ACTIVATIONS.labels(outcome=denied.code).inc()
        raise
    metrics.GRANTED.inc()
    keys = services().keys.current  # the JWKS rides along: a site that cannot fetch it pins a rotated key
    return {"layerlock": OFFLINE_RESPONSE, "v": 1, "machine": req.machine, "model": req.model, **result,
            "jwks": jwks(list(keys.published), keys.endorsements)}


def _activate(svc: Services, req: ActivationRequest, ip: str, *, offline: bool = False,
              actor: str = "") -> dict[str, Any]:
    cfg = svc.config
    nonce_ttl = (cfg.offline_request_ttl if offline else cfg.clock_skew) + cfg.clock_skew + 60
    nonce_key = guards.nonce_key(req.machine, req.nonce)
    channel: dict[str, Any] = {"channel": "offline", "actor": actor} if offline else {}

    def attempt() -> dict[str, Any]:
        snap = svc.activation_reader(req.machine, req.model, ip)
        outcome = decide(snap, req, time.time(), cfg, svc.policy, _sig_key, offline=offline)
        change = guards.count_machine(Change().once(nonce_key, nonce_ttl), req.machine)
        if isinstance(outcome, Refusal):
            _refuse(svc, outcome, change, req, ip, snap, channel)
        return _grant(svc, req, snap, outcome, change, ip, channel)

    try:
        # a GuardFailed (something the decision was based on changed) decides again on fresh data
        return until_committed(attempt, what="the license")
    except Replayed:
        # nothing was written (no grant, no record): a capture replayed, counted only
        if offline:  # ... unless ops submitted it: a principal's act, audited
            svc.commits.commit("activation", None, machine=req.machine, model=req.model, outcome="denied",
                               reason=str(Denial.REPLAY), ip=ip, **channel)
        else:
            rejections.record(svc.redis, ip, Denial.REPLAY)
        raise ActivationDenied(Denial.REPLAY, "this request was already seen") from None
    except Conflict:
        # out of fresh decisions: transient for the sidecar (503 + Retry-After), not a refusal
        raise ActivationDenied(Denial.BUSY, "the license is changing too fast; retry shortly") from None


def _refuse(svc: Services, refusal: Refusal, change: Change, req: ActivationRequest, ip: str,
            snap: guards.Snapshot, channel: dict[str, Any]) -> NoReturn:
    if not refusal.audited:
        if channel:  # submitted by ops: audited, but nothing counted against a machine that proved nothing
            svc.commits.commit("activation", None, head=snap.head, head_read_at=snap.read_at, machine=req.machine,
                               model=req.model, outcome="denied", reason=str(refusal.reason), ip=ip, **channel)
        elif refusal.reason == Denial.RATE_LIMITED:
            rejections.count_only(refusal.reason)  # over budget: not even a counter write
        else:
            rejections.record(svc.redis, ip, refusal.reason)
        raise refusal.error()
    svc.commits.commit("activation", change, head=snap.head, head_read_at=snap.read_at, machine=req.machine,
                       model=req.model, outcome="denied", reason=str(refusal.reason), ip=ip, **channel)
    raise refusal.error()


def _grant(svc: Services, req: ActivationRequest, snap: guards.Snapshot, grant: Grant, change: Change,
           ip: str, channel: dict[str, Any]) -> dict[str, Any]:
    lic = grant.license
    wk, fresh = _wrapped_key(svc, req, snap.machine, snap.model, lic, grant.suite)
    iat, token, jti = _token(svc, req, grant, wk, offline=bool(channel))
    lkey, mkey = licenses.key(lic["license_id"]), machines.key(req.machine)
    for f in TOKEN_FIELDS:
        change.guard("eq", lkey, f, lic[f]) if f in lic else change.guard("nofield", lkey, f)
    change.guard("eq", mkey, "status", "active").guard("eq", mkey, "sig_pub", snap.machine["sig_pub"])
    change.guard("eq", models.key(req.model), "status", "active")
    if grant.seat:
        seats.take(change, lic, req.machine, snap.now, iat)
    change.write("HINCRBY", lkey, "activations", 1).hset(lkey, {"last_activation": str(iat), **fresh})
    # the snapshot's head, or a fresher one this process saw since (Commits._guess): a stale
    # guess costs one re-hash and round trip inside commit(), never a wrong record
    svc.commits.commit("activation", change, head=snap.head, head_read_at=snap.read_at, machine=req.machine,
                       model=req.model, outcome="granted", license=lic["license_id"], suite=grant.suite, jti=jti, ip=ip,
                       seat=True if grant.seat else None, **channel)
    return token


def _wrapped_key(svc: Services, req: ActivationRequest, mrec: dict[str, str], model: dict[str, str],
                 lic: dict[str, str], suite: str) -> tuple[str, dict[str, str]]:
    """``wk``: the data key HPKE-sealed to this machine, bound to (license, machine, model) --
    followed, for a fingerprinted model, by this license's values at the fingerprint positions.

    It depends only on the license, the machine's public keys and the model's data key — none
    of which changes once issued — so it is sealed once per license and suite and kept in the
    license hash (``wk_<suite>``, tagged with a digest of the recipient keys; a sealed value is
    no secret: only the machine's private key opens it, and every token carries it anyway).
    Every replica reuses it; the grant commit stores a freshly sealed one.  A pool or family
    license serves many (machine, model) pairs, so those are kept per worker instead
    (:data:`_WK_CACHE`), never in the license hash the activation reads.  Returns (wk, fields
    to store)."""
    field = licenses.WK_PREFIX + suite
    tag = hashlib.sha256(f"{mrec['kex_pub']}.{mrec.get('pq_pub', '')}".encode()).hexdigest()[:16]
    shared = licenses.pooled(lic) or bool(lic.get("family"))  # many machines or models: not in the hash
    memo = (lic["license_id"], req.machine, req.model, suite, tag)
    cached_tag, _, cached = lic.get(field, "").partition(":")
    if not shared and cached and hmac.compare_digest(cached_tag, tag):
        return cached, {}
    if shared and memo in _WK_CACHE:
        return _WK_CACHE[memo], {}
    pq = mlkem768_public(b64u_decode(mrec["pq_pub"])) if "pq_pub" in mrec else None
    recipient = public_for(suite, _kex_key(mrec["kex_pub"]), pq)
    secret = svc.keys.open_data_key(model["wrapped_key"], model["kek_id"], req.model)
    if model.get("fp_positions"):  # this license's values at the fingerprint positions ride along
        secret += license_values(secret_for(svc, req.model, model), lic["license_id"])
    wk = b64u_encode(seal(secret, recipient, suite, binding_info(lic["license_id"], req.machine, req.model)))
    if shared:
        if len(_WK_CACHE) >= _WK_CACHE_MAX:
            _WK_CACHE.clear()
        _WK_CACHE[memo] = wk
        return wk, {}
    return wk, {field: f"{tag}:{wk}"}


def _token(svc: Services, req: ActivationRequest, grant: Grant, wk: str, *,
           offline: bool) -> tuple[int, dict[str, Any], str]:
    """The signed token.  Its life: the license's offline grace (``airgap_ttl`` instead, when set,
    for an air-gapped activation), never past the license's expiry (unless it is lapsed: see
    :mod:`~layerlock.license_server.entitlements`) nor past a floating lease's end."""
    lic = grant.license
    iat = int(time.time())
    life = int(lic.get("airgap_ttl") or lic["offline_grace"]) if offline else int(lic["offline_grace"])
    ends = [iat + life]
    if not grant.lapsed:
        ends.append(int(lic["expires_at"]))
    lease = seats.lease_end(lic, iat) if grant.seat else None
    if lease is not None:
        ends.append(lease)
    exp = min(ends)
    ttl = life if offline else int(lic["token_ttl"])
    rna = min(iat + (2 * ttl) // 3, exp)
    jti = req.nonce if offline else secrets.token_hex(12)
    claims = LicenseClaims(iss=svc.config.issuer, aud=AUDIENCE, sub=req.machine, lic=lic["license_id"],
                           mdl=req.model, iat=iat, nbf=iat, exp=exp, jti=jti, wk=wk, suite=grant.suite, rna=rna)
    keys = svc.keys.current
    token = sign_token(claims, keys.signing, kid=keys.kid)
    return iat, {"token": token, "expires_at": exp, "renew_at": rna, "license_id": lic["license_id"]}, jti
