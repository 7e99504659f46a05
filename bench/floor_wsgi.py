"""The real server app plus ``POST /bench/floor``: the least any activation with layerlock's
guarantees must do, for ``bench/activate.py``'s floor series (never deployed: bench only).

Why: ``activation ÷ ping`` depends as much on what the cheapest possible activation costs on
this host as on the server's own code.  The floor endpoint keeps only what no design can drop:

* the same body parsing and shape checks as ``/v1/activate`` (``body`` + ``parse_request``) and
  its clock-skew check;
* one Redis round trip to read the machine's enrolled key (a Lua script, like the real read);
* the Ed25519 check of the request signature (proof of the machine key);
* the Ed25519-signed JWT with the same claims and the same size of ``wk`` (a cached seal, as the
  real server reuses one);
* one Redis round trip that burns the nonce, counts the request and appends a SHA-256-chained
  audit entry, atomically and only onto the head it was hashed against (a Lua script, like the
  real commit, with the same re-hash when another worker moved the head, and the same one commit
  at a time per process against the head the previous one left).

What it leaves out, and the real endpoint does: the decision's rules (status, expiry, seats,
device, rate budgets, suites), the guards that make a grant lose to a concurrent revocation,
the full audit record, metrics and the webhook outbox.  The gap between the two is what those cost.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from typing import Any

from layerlock.license_server.api.activation import _sig_key
from layerlock.license_server.api.common import body
from layerlock.license_server.app import services
from layerlock.license_server.store import machines
from layerlock.license_server.store.audit import GENESIS
from layerlock.license_server.store.guards import machine_counter, nonce_key
from layerlock.license_server.wsgi import app
from layerlock.shared.activation import FIELDS, parse_request, verify_signature
from layerlock.shared.errors import ActivationDenied, Denial
from layerlock.shared.keys import b64u_encode
from layerlock.shared.tokens import AUDIENCE, LicenseClaims, sign_token
from layerlock.shared.wrap import DEFAULT_SUITE

_READ = "return {redis.call('HGET', KEYS[1], 'sig_pub') or '', redis.call('GET', KEYS[2]) or ARGV[1]}"
# Like the real commit (store/commit.py): the entry is appended only if the chain head is still
# the one it was hashed against, else the current head comes back and the caller re-hashes.
_WRITE = """
local head = redis.call('GET', KEYS[4]) or ARGV[4]
if head ~= ARGV[3] then return {0, head} end
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', 180) then return {2, ''} end
redis.call('INCR', KEYS[2]); redis.call('EXPIRE', KEYS[2], 120)
redis.call('XADD', KEYS[3], '*', 'rec', ARGV[1], 'h', ARGV[2])
redis.call('SET', KEYS[4], ARGV[2])
return {1, ''}
"""
_HEAD, _STREAM = "{ll}bench:floor:head", "{ll}bench:floor:audit"
_SERIAL, _SEEN = threading.Lock(), [""]  # store/commit.py's Commits._serial and ._seen, in short
_WK = b64u_encode(os.urandom(80))  # 107 characters: the bench model's real wk (32-byte key, HPKE X25519)


def _scripts() -> tuple[Any, Any]:
    r = services().redis
    if "floor" not in app.extensions:
        app.extensions["floor"] = (r.register_script(_READ), r.register_script(_WRITE))
    return app.extensions["floor"]  # type: ignore[no-any-return]


@app.post("/bench/floor")
def floor() -> dict[str, Any]:
    req = parse_request(body(FIELDS))
    read, write = _scripts()
    sig_pub, head = read(keys=[machines.key(req.machine), _HEAD], args=[GENESIS])
    if not sig_pub:
        raise ActivationDenied(Denial.UNKNOWN_MACHINE, "unknown machine")
    svc = services()
    if abs(time.time() - req.ts) > svc.config.clock_skew:
        raise ActivationDenied(Denial.STALE_REQUEST, "request time is off the server clock")
    verify_signature(req, _sig_key(sig_pub))
    iat = int(time.time())
    claims = LicenseClaims(iss=svc.config.issuer, aud=AUDIENCE, sub=req.machine, lic="lic_" + "0" * 24,
                           mdl=req.model, iat=iat, nbf=iat, exp=iat + 3 * 86400, jti=secrets.token_hex(12),
                           wk=_WK, suite=DEFAULT_SUITE, rna=iat + 57600)
    keys = svc.keys.current
    token = sign_token(claims, keys.signing, kid=keys.kid)
    keys_ = [nonce_key(req.machine, req.nonce), machine_counter(req.machine), _STREAM, _HEAD]
    with _SERIAL:  # as the real commit: one at a time per process, against the head the last one left
        head = _SEEN[0] or head
        while True:  # another worker moved the head: re-hash against the new one
            record = f'{{"machine":"{req.machine}","model":"{req.model}","jti":"{claims.jti}","prev":"{head}"}}'
            digest = hashlib.sha256(record.encode()).hexdigest()
            status, current = write(keys=keys_, args=[record, digest, head, GENESIS])
            if int(status) != 0:
                _SEEN[0] = digest if int(status) == 1 else head
                break
            head = _SEEN[0] = current
    if int(status) == 2:
        raise ActivationDenied(Denial.REPLAY, "this request was already seen")
    return {"token": token, "expires_at": claims.exp, "renew_at": claims.rna, "license_id": claims.lic}
