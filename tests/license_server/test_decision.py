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
