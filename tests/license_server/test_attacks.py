"""The attacker's code, against a real gunicorn + Redis: what an outsider who knows a machine code
gets (nothing), what a keyless flood does to that machine (nothing), and how much audit trail junk
costs (none).  Each test here failed on the trust-on-first-use server it replaced."""

from __future__ import annotations

import time

import pytest
import requests

from layerlock.license_server.store import P
from layerlock.license_server.store.audit import STREAM
from layerlock.shared.tokens import parse_jwks, verify_token
from layerlock.shared.wrap import MachineKemKeys, binding_info, open_sealed
from tests.conftest import LicenseServer, fresh_minute
from tests.license_server.ls_helpers import Machine, activate, add_model, issue, new_machine, register


def _outsider_for(m: Machine) -> Machine:
    """Keys of his own, the victim's machine code (printed, pasted in tickets: not a secret)."""
    outsider = new_machine()
    outsider.code = m.code
    return outsider


def _claim(server, code: str, ttl: int | None = None) -> dict:
    resp = server.api("POST", f"/v1/machines/{code}/claims", {} if ttl is None else {"ttl": ttl})
    assert resp.status_code == 201, resp.text
    return resp.json()


def _enroll(server, m: Machine, claim: str) -> requests.Response:
    return requests.post(server.url + "/v1/enroll", json={"enrollment": m.enrollment, "claim": claim}, timeout=10)


def _audit_types(server, code: str) -> list[str]:
    items = server.api("GET", "/v1/audit", params={"machine": code, "limit": 1000}).json()["items"]
    return [rec["type"] for rec in items]


def _opens(server, m: Machine, resp: requests.Response, data_key: bytes, model_id: str) -> bool:
    jwks = parse_jwks(requests.get(server.url + "/.well-known/jwks.json", timeout=5).json())
    claims = verify_token(resp.json()["token"], jwks, machine_code=m.code)
    key = open_sealed(claims.wrapped_key, MachineKemKeys(m.kx).private_for(claims.suite), claims.suite,
                      binding_info(claims.lic, m.code, model_id))
    return key == data_key


def test_outsider_gets_nothing_when_ops_register_the_enrollment_code(license_server):
    m = new_machine()
    register(license_server, m)  # the documented flow: machines add LLE1.…
    model_id, data_key = add_model(license_server)
    issue(license_server, m, model_id)
    outsider = _outsider_for(m)
    assert activate(license_server, outsider, model_id).json()["error"] == "bad_signature"
    r = requests.post(license_server.url + "/v1/activate",
                      json={**outsider.request(model_id), "enrollment": outsider.enrollment}, timeout=10)
    assert r.status_code == 400  # there is no key-binding side door in the activation any more
    assert _enroll(license_server, outsider, "llc_" + "A" * 32).json()["error"] == "bad_claim"
    ok = activate(license_server, m, model_id)
    assert ok.status_code == 200 and _opens(license_server, m, ok, data_key, model_id)


def test_outsider_gets_nothing_when_ops_register_the_bare_code_and_the_host_claims_it(license_server):
    m = new_machine()
    register(license_server, m, enrolled=False)  # machines add LLK-… --claim
    model_id, data_key = add_model(license_server)
    issue(license_server, m, model_id)
    claim = _claim(license_server, m.code)
    assert license_server.api("GET", f"/v1/machines/{m.code}").json()["claim_expires_at"] == claim["expires_at"]
    outsider = _outsider_for(m)
    # before the host shows up: no token, no way to bind a key without the claim secret
    r = activate(license_server, outsider, model_id)
    assert (r.status_code, r.json()["error"]) == (401, "not_enrolled")
    for guess in ("llc_" + "A" * 32, "llc_" + claim["claim"][4:-1] + "x"):
        r = _enroll(license_server, outsider, guess)
        assert (r.status_code, r.json()["error"]) == (401, "bad_claim")
    assert license_server.api("GET", f"/v1/machines/{m.code}").json()["enrolled"] is False
    # the genuine host redeems its claim and activates
    r = _enroll(license_server, m, claim["claim"])
    assert r.status_code == 200 and r.json()["enrolled"] is True, r.text
    ok = activate(license_server, m, model_id)
    assert ok.status_code == 200 and _opens(license_server, m, ok, data_key, model_id)
    # afterwards the claim is spent: the outsider who learns it still gets nothing, and is audited
    r = _enroll(license_server, outsider, claim["claim"])
    assert (r.status_code, r.json()["error"]) == (409, "claim_used")
    assert activate(license_server, outsider, model_id).json()["error"] == "bad_signature"
    assert _audit_types(license_server, m.code).count("machine_enrolled") == 1
    refused = license_server.api("GET", "/v1/audit", params={"type": "claim_refused"}).json()["items"]
    assert [(rec["machine"], rec["reason"]) for rec in refused] == [(m.code, "claim_used")]


def test_bare_code_alone_binds_no_key(license_server):
    m = new_machine()
    register(license_server, m, enrolled=False)
    model_id, _ = add_model(license_server)
    issue(license_server, m, model_id)
    for who in (m, _outsider_for(m)):
        r = activate(license_server, who, model_id)
        assert (r.status_code, r.json()["error"]) == (401, "not_enrolled")
    assert license_server.api("GET", f"/v1/machines/{m.code}").json()["enrolled"] is False


def test_expired_superseded_and_foreign_claims_are_refused_and_audited(license_server):
    m, other = new_machine(), new_machine()
    register(license_server, m, enrolled=False)
    register(license_server, other, enrolled=False)
    short = _claim(license_server, m.code, ttl=2)
    time.sleep(2.2)
    r = _enroll(license_server, m, short["claim"])
    assert (r.status_code, r.json()["error"]) == (409, "claim_expired")
    first, second = _claim(license_server, m.code), _claim(license_server, m.code)
    assert _enroll(license_server, m, first["claim"]).json()["error"] == "claim_superseded"
    foreign = _claim(license_server, other.code)
    assert _enroll(license_server, m, foreign["claim"]).json()["error"] == "claim_mismatch"
    assert license_server.api("GET", f"/v1/machines/{m.code}").json()["enrolled"] is False
    assert _enroll(license_server, m, second["claim"]).status_code == 200
    refused = license_server.api("GET", "/v1/audit", params={"type": "claim_refused"}).json()["items"]
    assert sorted(rec["reason"] for rec in refused) == ["claim_expired", "claim_mismatch", "claim_superseded"]
    # a machine that has its key cannot be given a claim (no re-keying through the back door)
    r = license_server.api("POST", f"/v1/machines/{m.code}/claims", {})
    assert r.status_code == 409


def test_claim_secret_is_stored_hashed_and_never_audited(license_server):
    m = new_machine()
    register(license_server, m, enrolled=False)
    claim = _claim(license_server, m.code)
    assert _enroll(license_server, m, claim["claim"]).status_code == 200
    r = license_server.redis()
    secret = claim["claim"]
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        blob = repr({"hash": lambda: r.hgetall(key), "string": lambda: r.get(key),
                     "stream": lambda: r.xrange(key), "zset": lambda: r.zrange(key, 0, -1),
                     "set": lambda: r.smembers(key)}.get(kind, lambda: "")())
        assert secret not in blob and secret[4:] not in key, key


def test_bad_claim_requests_change_nothing(license_server):
    m = new_machine()
    register(license_server, m, enrolled=False)
    from tests.license_server.ls_helpers import snapshot

    before = snapshot(license_server.redis())
    for doc in ({"enrollment": m.enrollment}, {"claim": "llc_x"}, {"enrollment": m.enrollment, "claim": 5},
                {"enrollment": m.enrollment, "claim": "nope"}, {"enrollment": "LLE1.a.b", "claim": "llc_abc"},
                {"enrollment": m.enrollment, "claim": "llc_abc", "extra": 1}):
        r = requests.post(license_server.url + "/v1/enroll", json=doc, timeout=10)
        assert 400 <= r.status_code < 500 and set(r.json()) == {"error", "message"}, (doc, r.text)
    after = snapshot(license_server.redis())
    assert {k for k in after if not k.startswith("{ll}:rejects:")} == set(before)
    assert all(after[k] == before[k] for k in before)


@pytest.fixture
def tight_server(tmp_path, redis_server):
    """Default budgets, small enough to reach in a test: 20 failures / 20 signed requests a minute."""
    server = LicenseServer(tmp_path / "server", redis_server.url,
                           env={"LAYERLOCK_RATE_UNAUTH_PER_MIN": "20", "LAYERLOCK_RATE_MACHINE_PER_MIN": "20"})
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_keyless_flood_neither_locks_the_machine_out_nor_grows_the_audit_trail(tight_server):
    srv = tight_server
    m = new_machine()
    register(srv, m)
    model_id, _ = add_model(srv)
    issue(srv, m, model_id)
    r = srv.redis()
    audit_len = r.xlen(STREAM)
    outsider = _outsider_for(m)
    stranger = new_machine()  # an unregistered code
    codes = []
    fresh_minute(40)  # budgets per minute, rejections per hour: the flood and its counts in one window
    with requests.Session() as s:
        for i in range(150):  # 7x the per-minute budget of both counters
            who = outsider if i % 2 else stranger
            codes.append(s.post(srv.url + "/v1/activate", json=who.request(model_id), timeout=10).json()["error"])
            if i % 30 == 0:  # the genuine machine renews throughout the flood, from the same address
                assert s.post(srv.url + "/v1/activate", json=m.request(model_id), timeout=10).status_code == 200
    assert set(codes[:20]) <= {"bad_signature", "unknown_machine"}
    assert set(codes[20:]) == {"rate_limited"}  # the source's failure budget is spent
    genuine = activate(srv, m, model_id)
    assert genuine.status_code == 200, genuine.text
    # 6 grants recorded; not one record for the 150 junk requests
    assert r.xlen(STREAM) == audit_len + 6
    # the flood never counted against the machine: only its own 6 signed requests did
    counters = [int(r.get(k)) for k in r.scan_iter(f"{P}rl:m:{m.code}:*")]
    assert sum(counters) == 6
    # the junk is visible, aggregated and bounded: one hash per hour, one field per reason
    totals = srv.api("GET", "/v1/audit/rejections", params={"hours": 1}).json()["totals"]
    assert totals["bad_signature"] + totals["unknown_machine"] == 20
    assert len(list(r.scan_iter("{ll}:rejects:*"))) == 1
    metrics = requests.get(srv.url + "/metrics", timeout=5).text
    assert 'layerlock_rejected_total{reason="rate_limited"}' in metrics


def test_signed_requests_over_the_machine_budget_are_refused_not_audited(tight_server):
    srv = tight_server
    m = new_machine()
    register(srv, m)
    model_id, _ = add_model(srv)
    issue(srv, m, model_id)
    audit_len = srv.redis().xlen(STREAM)
    fresh_minute()  # the machine's budget is per minute: all 30 in one
    outcomes = [activate(srv, m, model_id).status_code for _ in range(30)]
    assert outcomes[:20] == [200] * 20 and set(outcomes[20:]) == {429}
    assert srv.redis().xlen(STREAM) == audit_len + 20
