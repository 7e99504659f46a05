"""The activation decision as a pure function: each rule, and the order in which they apply."""

from __future__ import annotations

import time

import pytest
from ls_helpers import new_machine

from layerlock.license_server.config import ServerConfig
from layerlock.license_server.decision import Grant, Refusal, decide
from layerlock.license_server.policy import SuitePolicy
from layerlock.license_server.store import licenses, machines
from layerlock.license_server.store.guards import Snapshot
from layerlock.shared.activation import make_request
from layerlock.shared.enrollment import parse_code
from layerlock.shared.errors import DEFINITIVE
from layerlock.shared.keys import b64u_decode, ed25519_public

NOW = 1_800_000_000.0
CFG = ServerConfig(rate_machine_per_min=5, rate_unauth_per_min=3, clock_skew=60)
POLICY = SuitePolicy()


def _key(b64: str):
    return ed25519_public(b64u_decode(b64))


def _world(**over):
    m = new_machine()
    mrec = machines.record(m.code, "acme", {}, parse_code(m.enrollment))
    lic = licenses.record(m.code, "mdl", "acme", int(NOW) - 10, int(NOW) + 3600, 60, 120)
    snap = Snapshot(machine_hits=0, source_failures=0, machine=mrec, model={"status": "active"}, licenses=[lic],
                    head="0" * 64)
    for k, v in over.items():
        setattr(snap, k, v)
    return m, snap


def _decide(snap, req, now=NOW, cfg=CFG, policy=POLICY):
    return decide(snap, req, now, cfg, policy, _key)


def _reason(outcome) -> str:
    assert isinstance(outcome, Refusal), outcome
    return str(outcome.reason)


def test_a_signed_fresh_request_for_an_active_license_is_granted():
    m, snap = _world()
    out = _decide(snap, make_request(m.code, "mdl", m.sk, now=NOW))
    assert isinstance(out, Grant) and out.license is snap.licenses[0] and out.suite == "X25519-SHA256-AES256GCM"


@pytest.mark.parametrize("case, reason, audited", [
    ("unknown machine", "unknown_machine", False),
    ("no key on file", "not_enrolled", False),
    ("another key signed", "bad_signature", False),
    ("an hour old", "stale_request", False),
    ("machine over its budget", "rate_limited", False),
    ("machine deactivated", "machine_inactive", True),
    ("model retired", "unknown_model", True),
    ("license revoked", "revoked", True),
    ("license expired", "expired", True),
    ("license pending", "no_license", True),
    ("no license", "no_license", True),
])
def test_each_rule_names_its_reason_and_whether_it_is_audited(case, reason, audited):
    m, snap = _world()
    signer, ts = m.sk, NOW
    if case == "unknown machine":
        snap.machine = {}
    elif case == "no key on file":
        snap.machine = machines.record(m.code, "acme", {}, None)
    elif case == "another key signed":
        signer = new_machine().sk
    elif case == "an hour old":
        ts = NOW - 3600
    elif case == "machine over its budget":
        snap.machine_hits = CFG.rate_machine_per_min
    elif case == "machine deactivated":
        snap.machine["status"] = "inactive"
    elif case == "model retired":
        snap.model = {"status": "retired"}
    elif case == "license revoked":
        snap.licenses[0]["status"] = "revoked"
    elif case == "license expired":
        snap.licenses[0]["expires_at"] = str(int(NOW) - 1)
    elif case == "license pending":
        snap.licenses[0]["not_before"] = str(int(NOW) + 60)
    elif case == "no license":
        snap.licenses = []
    out = _decide(snap, make_request(m.code, "mdl", signer, now=ts))
    assert _reason(out) == reason and out.audited is audited


def test_a_spent_source_budget_only_affects_requests_that_prove_nothing():
    m, snap = _world(source_failures=CFG.rate_unauth_per_min)
    assert isinstance(_decide(snap, make_request(m.code, "mdl", m.sk, now=NOW)), Grant)  # a NAT neighbour flooding
    forged = make_request(m.code, "mdl", new_machine().sk, now=NOW)
    assert _reason(_decide(snap, forged)) == "rate_limited"
    snap.machine = {}
    assert _reason(_decide(snap, make_request(m.code, "mdl", m.sk, now=NOW))) == "rate_limited"


def test_authentication_is_decided_before_anything_about_the_license():
    """An outsider learns nothing about a machine's licenses, model or status without its key."""
    m, snap = _world()
    snap.machine["status"] = "inactive"
    snap.licenses = []
    snap.model = {}
    forged = make_request(m.code, "mdl", new_machine().sk, now=NOW)
    assert _reason(_decide(snap, forged)) == "bad_signature"
    stale = make_request(m.code, "mdl", m.sk, now=NOW - 3600)
    assert _reason(_decide(snap, stale)) == "stale_request"


def test_the_longest_active_license_wins_and_revoked_beats_expired_only_when_nothing_is_active():
    m, snap = _world()
    longer = licenses.record(m.code, "mdl", "acme", int(NOW) - 10, int(NOW) + 7200, 60, 120)
    expired = licenses.record(m.code, "mdl", "acme", int(NOW) - 10, int(NOW) - 5, 60, 120)
    snap.licenses = [expired, snap.licenses[0], longer]
    out = _decide(snap, make_request(m.code, "mdl", m.sk, now=NOW))
    assert isinstance(out, Grant) and out.license is longer
    revoked = {**longer, "status": "revoked"}
    snap.licenses = [expired, revoked]
    assert _reason(_decide(snap, make_request(m.code, "mdl", m.sk, now=NOW))) == "expired"


def test_the_policy_decides_last_and_can_require_a_suite():
    m, snap = _world()
    policy = SuitePolicy({"suite": "MLKEM768X25519-SHA256-AES256GCM", "require": True})
    out = _decide(snap, make_request(m.code, "mdl", m.sk, now=NOW), policy=policy)
    assert _reason(out) == "suite_required" and out.audited


def test_decide_reads_no_clock():
    """A request stamped NOW is fresh when decided at NOW, although the real clock is weeks away
    (beyond the skew): the decision uses the time it is given, never a hidden time.time()."""
    m, snap = _world()
    req = make_request(m.code, "mdl", m.sk, now=NOW)
    assert abs(time.time() - NOW) > CFG.clock_skew
    assert isinstance(_decide(snap, req, now=NOW), Grant)
    assert _reason(_decide(snap, req, now=time.time())) == "stale_request"


# --- pool licenses (seats, floating) and family entitlements: rules 9-11 -------------------------
def _pool(m, *, seats="2", used="0", held="", kind="floating", expires=3600, **terms):
    rec = licenses.record("", "mdl", "acme", int(NOW) - 10, int(NOW) + expires, 60, 120,
                          terms={"kind": kind, "seats": seats, "lease_ttl": "60", "revive_ttl": "60", **terms})
    return {**rec, "_used": used, "_held": held}


def _family(rule="all", *, expires=3600, max_version=None):
    terms = {"family": "resnet", "versions": rule, **({"max_version": max_version} if max_version else {})}
    return licenses.record("M", "", "acme", int(NOW) - 10, int(NOW) + expires, 60, 120, terms=terms)


def _grant_or_reason(snap, m, model="mdl"):
    out = _decide(snap, make_request(m.code, model, m.sk, now=NOW))
    return out.license["license_id"] if isinstance(out, Grant) else str(out.reason)


def test_a_pool_license_grants_while_a_seat_is_free_and_then_says_seats_exhausted():
    m, snap = _world()
    pool = _pool(m, used="1")
    snap.licenses = [pool]
    assert _grant_or_reason(snap, m) == pool["license_id"]
    snap.licenses = [{**pool, "_used": "2"}]
    out = _decide(snap, make_request(m.code, "mdl", m.sk, now=NOW))
    assert _reason(out) == "seats_exhausted" and out.audited
    assert "seats_exhausted" not in {str(d) for d in DEFINITIVE}  # transient for the sidecar


def test_a_machine_holding_a_live_seat_renews_even_when_the_pool_is_full_and_revives_within_its_window():
    m, snap = _world()
    snap.licenses = [_pool(m, used="2", held=str(NOW + 30))]  # a renewal (or a revival: lease over, seat kept)
    out = _decide(snap, make_request(m.code, "mdl", m.sk, now=NOW))
    assert isinstance(out, Grant) and out.seat
    snap.licenses = [_pool(m, used="2", held=str(NOW - 1))]  # lapsed past its revive window: no seat of its own
    assert _grant_or_reason(snap, m) == "seats_exhausted"


def test_own_license_first_then_a_held_seat_then_a_free_seat():
    m, snap = _world()
    own = snap.licenses[0]
    free = _pool(m, used="0", expires=9000)
    held = _pool(m, used="2", held=str(NOW + 30), expires=5000)
    snap.licenses = [free, held, own]
    assert _grant_or_reason(snap, m) == own["license_id"]  # takes no seat, although it ends first
    snap.licenses = [free, held]
    assert _grant_or_reason(snap, m) == held["license_id"]  # keeps the seat it has
    snap.licenses = [free, {**held, "_held": ""}]
    assert _grant_or_reason(snap, m) == free["license_id"]


def test_family_rules_all_max_and_maintain():
    m, snap = _world()
    snap.model = {"status": "active", "family": "resnet", "version": "1.10", "released_at": str(int(NOW) - 100)}
    every, upto_1_9, upto_1_10 = _family("all"), _family("max", max_version="1.9"), _family("max", max_version="1.10")
    for lic, want in ((every, "grant"), (upto_1_9, "not_entitled"), (upto_1_10, "grant")):
        snap.licenses = [lic]
        got = _grant_or_reason(snap, m, "resnet-1.10")
        assert got == (lic["license_id"] if want == "grant" else want), (lic, got)
    # maintain: a version released before the license expired stays licensed after it, tokens uncapped
    lapsed = _family("maintain", expires=-50)
    snap.licenses = [lapsed]
    out = _decide(snap, make_request(m.code, "resnet-1.10", m.sk, now=NOW))
    assert isinstance(out, Grant) and out.lapsed
    snap.model = {**snap.model, "released_at": str(int(NOW) - 10)}  # released after the license lapsed
    assert _grant_or_reason(snap, m, "resnet-1.10") == "not_entitled"
    assert _grant_or_reason(snap, m, "resnet-1.10") != "expired"
    # an expired "all" license is just expired; another family's license covers nothing
    snap.licenses = [_family("all", expires=-50)]
    assert _grant_or_reason(snap, m, "resnet-1.10") == "expired"
    snap.model = {**snap.model, "family": "vit"}
    assert _grant_or_reason(snap, m, "resnet-1.10") == "not_entitled"


def test_a_retired_version_is_refused_before_any_license_rule():
    m, snap = _world()
    snap.model = {"status": "retired", "family": "resnet", "version": "2"}
    snap.licenses = [_family("all")]
    assert _grant_or_reason(snap, m, "resnet-2") == "unknown_model"


def test_an_offline_request_may_be_days_old_but_never_from_the_future():
    m, snap = _world()
    old = make_request(m.code, "mdl", m.sk, now=NOW - 3 * 86400)
    assert _reason(_decide(snap, old)) == "stale_request"
    assert isinstance(decide(snap, old, NOW, CFG, POLICY, _key, offline=True), Grant)
    ahead = make_request(m.code, "mdl", m.sk, now=NOW + 3600)
    assert _reason(decide(snap, ahead, NOW, CFG, POLICY, _key, offline=True)) == "stale_request"
    # ops submitted it: a spent source budget does not apply, and a failure is still audited upstream
    snap.source_failures = CFG.rate_unauth_per_min
    assert isinstance(decide(snap, old, NOW, CFG, POLICY, _key, offline=True), Grant)
