"""Enrollment claims: the proof that a key belongs to the host ops meant.

A machine code is not a secret (it is printed, pasted into tickets, derived from public
inputs), so registering a host by its code must not let whoever shows up first bind a key to
it.  A key is bound only in one of two ways:

* ops paste the host's whole enrollment code into ``machines add`` — the key travels with the
  code, out of band, and is bound at registration; or
* ops create a **claim** for a registered machine: a random single-use secret, shown once,
  stored only as its SHA-256 (``{ll}:claim:<sha256>``), that expires.  The host presents it
  with its self-signed enrollment code (``layerlock-verifier enroll --claim``); the key is
  bound, the claim marked used and the ``machine_enrolled`` record appended in one commit.

The secret carries 192 random bits, so a plain SHA-256 is a safe at-rest hash, and looking it
up by that hash compares nothing secret in Python.  A presented claim that is used, expired,
superseded or for another machine is refused and audited (its holder is a principal: he has
the secret); an unknown secret is only counted (anyone can send one).
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from layerlock.license_server.store import P, machines, new_id, now_ms
from layerlock.license_server.store.commit import Change, Commits, until_committed
from layerlock.shared.enrollment import Enrollment
from layerlock.shared.errors import ClaimRefused, Conflict, NotFound

PREFIX = "llc_"
#: A used or expired claim is kept this long after its expiry, so presenting it again gets a
#: precise refusal (and an audit record) instead of "unknown claim".
KEEP_AFTER_EXPIRY_S = 7 * 86_400


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(24)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def key(secret_digest: str) -> str:
    return f"{P}claim:{secret_digest}"


def create(commits: Commits, code: str, ttl: int, *, actor: str) -> dict[str, Any]:
    """A fresh claim for a registered, active machine that has no key yet.

    Returns the secret (the only time it exists outside the host and the operator's screen)
    with its id and expiry.  A newer claim supersedes an older open one for the same machine.
    """
    mkey = machines.key(code)

    def attempt() -> dict[str, Any]:
        rec = commits.r.hgetall(mkey)
        if not rec:
            raise NotFound(f"machine {code} is not registered")
        if "sig_pub" in rec:
            raise Conflict(f"machine {code} already has its key: a claim is for a machine registered by code")
        if rec.get("status") != "active":
            raise Conflict(f"machine {code} is deactivated; reactivate it first")
        secret, claim_id = new_secret(), new_id("clm")
        created = now_ms() // 1000
        expires = created + ttl
        ckey = key(digest(secret))
        change = (Change().same_hash(mkey, rec)
                  .hset(ckey, {"claim_id": claim_id, "machine": code, "status": "open",
                               "created_at": str(created), "expires_at": str(expires), "created_by": actor})
                  .write("EXPIREAT", ckey, expires + KEEP_AFTER_EXPIRY_S)
                  .hset(mkey, {"claim_id": claim_id, "claim_expires_at": str(expires)}))
        commits.commit("claim_created", change, actor=actor, machine=code, claim=claim_id, expires_at=expires,
                       superseded=rec.get("claim_id"))
        return {"machine": code, "claim": secret, "claim_id": claim_id, "expires_at": expires}

    return until_committed(attempt, what=f"machine {code}")


def redeem(commits: Commits, secret: str, enrollment: Enrollment, *, now: int, ip: str) -> dict[str, str]:
    """Bind ``enrollment``'s keys to its machine if ``secret`` is that machine's open claim.

    The enrollment code's self-signature (checked by the caller when parsing it) proves the
    presenter holds the signing key it names; the claim proves ops meant this host.
    """
    ckey = key(digest(secret))
    mkey = machines.key(enrollment.machine)

    def attempt() -> dict[str, str]:
        with commits.r.pipeline(transaction=False) as pipe:
            pipe.hgetall(ckey)
            pipe.hgetall(mkey)
            claim, mrec = pipe.execute()
        if not claim:
            raise ClaimRefused("bad_claim", "unknown claim secret (mistyped, or never issued)")
        reason = _refusal(claim, mrec, enrollment.machine, now)
        if reason is not None:
            commits.append("claim_refused", machine=claim["machine"], claim=claim["claim_id"], reason=reason[0], ip=ip)
            raise ClaimRefused(*reason)
        change = (Change().same_hash(ckey, claim).same_hash(mkey, mrec)
                  .hset(ckey, {"status": "used", "used_at": str(now)})
                  .hset(mkey, machines.enrollment_fields(enrollment)))
        commits.commit("machine_enrolled", change, machine=enrollment.machine, claim=claim["claim_id"], via="claim",
                       ip=ip)
        return {**mrec, **machines.enrollment_fields(enrollment)}

    return until_committed(attempt, what=f"machine {enrollment.machine}")


def _refusal(claim: dict[str, str], mrec: dict[str, str], machine: str, now: int) -> tuple[str, str] | None:
    if claim.get("machine") != machine:
        return "claim_mismatch", "this claim was issued for another machine code"
    if claim.get("status") == "used":
        return "claim_used", "this claim was already used; ask ops for a new one"
    if now >= int(claim.get("expires_at", "0")):
        return "claim_expired", "this claim has expired; ask ops for a new one"
    if not mrec:
        return "claim_mismatch", "the machine this claim was issued for is no longer registered"
    if mrec.get("claim_id") != claim.get("claim_id"):
        return "claim_superseded", "a newer claim was issued for this machine; use that one"
    if "sig_pub" in mrec:
        return "claim_used", "this machine already has its key"
    if mrec.get("status") != "active":
        return "machine_inactive", "this machine has been deactivated"
    return None
