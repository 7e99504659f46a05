"""Whether an activation request earns a token: a pure function over one snapshot.

:func:`decide` reads nothing and writes nothing (no Flask, no Redis, no clock): it gets the
snapshot the blueprint read in one round trip, the parsed request, the time and the
configuration, and returns a :class:`Grant` or a :class:`Refusal`.  The blueprint
(:mod:`layerlock.license_server.api.activation`) does all the I/O around it: the read, the
token, the guarded commit, the audit record, the counters.

The rules, in the order they are applied (the first that fails decides):

1. The machine is registered — else ``unknown_machine``.
2. The machine has a key on file — else ``not_enrolled`` (registered by code, never claimed).
3. The request's signature verifies with that key — else ``bad_signature``.
4. The request's time is within ``clock_skew`` of ours — else ``stale_request``.
5. Rules 1-4 are *unauthenticated* failures: the request proved nothing, so it is counted per
   source and hour, never audited, and never counted against the machine it names (nobody can
   lock a machine out without its key).  A source that has used up its failure budget
   (``rate_unauth_per_min`` a minute) gets ``rate_limited`` for such a request instead, which
   costs no write at all.  The budget never touches a request that passes rules 1-4, so a
   flood from behind the same address (a shared NAT) does not lock genuine machines out.
6. The machine has made fewer than ``rate_machine_per_min`` signed requests this minute —
   else ``rate_limited`` (counted, not audited: the flood would otherwise grow the trail).
7. The machine is active — else ``machine_inactive``.
8. The model is registered and not retired — else ``unknown_model``.
9. A candidate license covers the model: the candidates are the machine's own licenses and its
   customer's pool licenses (seats, floating), each naming this model or its family; a family
   license covers only the versions its rule admits (:mod:`~layerlock.license_server.entitlements`:
   all, up to a version, released before its expiry) — else ``no_license`` (no candidate) or
   ``not_entitled`` (only family licenses that exclude this version).
10. A covering license is active now (an expired ``maintain`` license still is, for the versions
    it covers: *lapsed*) — else ``no_license`` (only pending ones), ``expired`` or ``revoked``.
11. Among the active ones, in this order, the one that lasts longest: a machine license (takes no
    seat); a pool license on which this machine holds a live seat (a renewal, or a revival
    within the revive window); a pool license with a free seat.  If every active one is a pool
    whose seats are all live and held by others — ``seats_exhausted``.  The commit re-checks the
    seat under a guard (:func:`layerlock.license_server.store.seats.take`), so racing machines
    never hold more seats than the license has: a loser decides again on fresh data.
12. The suite policy can serve this device — else ``suite_required``.

Rules 7-12 are audited: a machine that proved it holds its key is a principal.  Whether the
nonce is fresh (``replay``) is decided by the commit itself, atomically with the grant.

Air-gapped activations (``offline=True``: ops submit the machine's signed request file with an
API key) pass the same rules but for two: rule 4 accepts a request up to
``offline_request_ttl`` old (it travels by hand), and rule 5's source budget does not apply (the
submitter is an authenticated principal, and every outcome is audited).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from layerlock.license_server import entitlements
from layerlock.license_server.config import ServerConfig
from layerlock.license_server.policy import SuitePolicy
from layerlock.license_server.store import licenses, machines
from layerlock.license_server.store.guards import Snapshot
from layerlock.shared.activation import ActivationRequest, verify_signature
from layerlock.shared.errors import UNAUTHENTICATED, ActivationDenied, Denial, LayerlockError


@dataclass(frozen=True)
class Grant:
    license: dict[str, str]
    suite: str
    #: An expired ``maintain`` license still covering this version: tokens are not capped by its expiry.
    lapsed: bool = False

    @property
    def seat(self) -> bool:
        """Whether the grant takes (or renews) a seat of a pool license."""
        return licenses.pooled(self.license)


@dataclass(frozen=True)
class Refusal:
    reason: Denial
    message: str

    @property
    def audited(self) -> bool:
        """Whether the refusal names a principal's act (rules 7-12), as opposed to a request
        that proved nothing or a flood (rules 1-6)."""
        return self.reason not in UNAUTHENTICATED

    def error(self) -> ActivationDenied:
        return ActivationDenied(self.reason, self.message)


def decide(snap: Snapshot, req: ActivationRequest, now: float, config: ServerConfig, policy: SuitePolicy,
           machine_key: Any, *, offline: bool = False) -> Grant | Refusal:
    """Apply the rules above.  ``machine_key(b64) -> Ed25519PublicKey`` parses the machine's
    stored key (the caller caches parsed keys; parsing is the only costly part)."""
    failed = _unauthenticated(snap, req, now, config, machine_key, offline)
    if failed is not None:
        if not offline and snap.source_failures >= config.rate_unauth_per_min:
            return Refusal(Denial.RATE_LIMITED, "too many failed requests from this address; slow down")
        return failed
    mrec = snap.machine
    if snap.machine_hits >= config.rate_machine_per_min:
        return Refusal(Denial.RATE_LIMITED, "too many activation requests for this machine; slow down")
    if mrec.get("status") != "active":
        return Refusal(Denial.MACHINE_INACTIVE, "this machine has been deactivated")
    if not snap.model or snap.model.get("status") != "active":
        return Refusal(Denial.UNKNOWN_MODEL, "this model is not registered (or retired)")
    lic = _license(snap, req.model, now)
    if isinstance(lic, Refusal):
        return lic
    try:
        suite = policy.choose(machines.device_of(mrec), "pq_pub" in mrec)
    except ActivationDenied as denied:
        return Refusal(Denial(denied.code), denied.message)
    return Grant(license=lic, suite=suite, lapsed=entitlements.standing(lic, now) == "lapsed")


def _unauthenticated(snap: Snapshot, req: ActivationRequest, now: float, config: ServerConfig,
                     machine_key: Any, offline: bool) -> Refusal | None:
    """Rules 1-4: does the request prove possession of the machine's enrolled key, now?"""
    mrec = snap.machine
    if not mrec:
        return Refusal(Denial.UNKNOWN_MACHINE, "this machine is not registered")
    if "sig_pub" not in mrec:
        return Refusal(Denial.NOT_ENROLLED, "this machine has no key on file: register it with its enrollment "
                                            "code, or enroll it with a claim (layerlock-verifier enroll --claim)")
    try:
        verify_signature(req, _key(machine_key, mrec["sig_pub"]))
    except LayerlockError:
        return Refusal(Denial.BAD_SIGNATURE, "request signature does not verify with the machine key")
    if not offline and abs(now - req.ts) > config.clock_skew:
        return Refusal(Denial.STALE_REQUEST, f"request time is more than {config.clock_skew}s off the server clock")
    if offline and (req.ts - now > config.clock_skew or now - req.ts > config.offline_request_ttl):
        return Refusal(Denial.STALE_REQUEST, f"the request file is more than {config.offline_request_ttl}s old "
                                             f"(or dated more than {config.clock_skew}s ahead): make a new one")
    return None


def _key(parse: Any, b64: str) -> Ed25519PublicKey:
    key: Ed25519PublicKey = parse(b64)
    return key


def _lasts(rec: dict[str, str], now: float) -> float:
    return float("inf") if entitlements.standing(rec, now) == "lapsed" else float(rec["expires_at"])


def _license(snap: Snapshot, model_id: str, now: float) -> dict[str, str] | Refusal:
    """Rules 9-11: the license to grant under, or why there is none."""
    recs = [rec for rec in snap.licenses if entitlements.covers(rec, model_id, snap.model)]
    if snap.licenses and not recs:
        return Refusal(Denial.NOT_ENTITLED, f"the license's version rule does not cover {model_id} "
                                            f"(family {snap.model.get('family') or '-'}, version "
                                            f"{snap.model.get('version') or '-'})")
    states = {rec["license_id"]: entitlements.standing(rec, now) for rec in recs}
    active = [rec for rec in recs if states[rec["license_id"]] in ("active", "lapsed")]
    if active:
        return _seat_order(active, now)
    if not recs or "pending" in states.values():
        return Refusal(Denial.NO_LICENSE, "no valid license for this machine and model")
    if "expired" in states.values():
        return Refusal(Denial.EXPIRED, "the license has expired")
    return Refusal(Denial.REVOKED, "the license has been revoked")


def _seat_order(active: list[dict[str, str]], now: float) -> dict[str, str] | Refusal:
    """Rule 11: own license, then a seat this machine holds, then a free seat."""
    own = [rec for rec in active if not licenses.pooled(rec)]
    held = [rec for rec in active if licenses.pooled(rec) and rec.get("_held") and float(rec["_held"]) >= now]
    free = [rec for rec in active if licenses.pooled(rec) and int(rec.get("_used", "0")) < int(rec["seats"])]
    for group in (own, held, free):
        if group:
            return max(group, key=lambda rec: _lasts(rec, now))
    busy = max(active, key=lambda rec: _lasts(rec, now))
    return Refusal(Denial.SEATS_EXHAUSTED, f"all {busy['seats']} seats of license {busy['license_id']} are in use "
                                           "by other machines; retry later (a seat frees when a lease lapses or "
                                           "ops release one)")
