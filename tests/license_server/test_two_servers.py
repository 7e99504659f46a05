"""Two license-server replicas on one Redis: "replicas never disagree" (README, Scaling out).

Two real gunicorn servers (``deploy/gunicorn.conf.py``, 2 workers each) on one real
``redis-server``, sharing one key directory the way replicas behind a load balancer do (the
second gets a copy of the first's ``data_dir``, as a second host would).  Whatever is done
through one is seen by the other at once -- registration, issuance, activation, revocation --
and concurrent writes through both keep one unbroken audit chain and lose no update.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from ls_helpers import activate, add_model, issue, new_machine, register

from layerlock.shared.tokens import parse_jwks, verify_token
from tests.conftest import LicenseServer, make_redis


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LicenseServer, LicenseServer]]:
    base = tmp_path_factory.mktemp("two")
    rs = make_redis(base / "redis")
    rs.start()
    a = LicenseServer(base / "a", rs.url)
    b = a.replica(base / "b")
    try:
        with ThreadPoolExecutor(2) as pool:  # both start (and bootstrap the admin key) at once
            list(pool.map(LicenseServer.start, (a, b)))
        yield a, b
    finally:
        a.stop()
        b.stop()
        rs.kill()


def _verify(server: LicenseServer) -> dict:
    resp = server.api("GET", "/v1/audit/verify")
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_replicas_share_keys_admin_key_and_one_chain(pair):
    a, b = pair
    jwks = [requests.get(s.url + "/.well-known/jwks.json", timeout=5).json() for s in (a, b)]
    assert jwks[0] == jwks[1] and jwks[0]["keys"]
    for s in (a, b):
        assert s.api("GET", "/v1/machines").status_code == 200  # the one admin key works on both
    records = a.api("GET", "/v1/audit", params={"type": "apikey_created", "limit": 100}).json()["items"]
    assert len(records) == 1, records  # bootstrapped once, though both started together
    assert _verify(a) == _verify(b) and _verify(a)["ok"] is True


def test_issue_on_one_activate_on_the_other_revoke_on_one_and_the_other_denies(pair):
    a, b = pair
    m = new_machine()
    register(b, m)
    assert a.api("GET", f"/v1/machines/{m.code}").json()["customer"] == "acme"
    model_id, _ = add_model(a)
    lic = issue(a, m, model_id)
    assert b.api("GET", f"/v1/licenses/{lic['license_id']}").json()["status"] == "active"

    resp = activate(b, m, model_id)
    assert resp.status_code == 200, resp.text
    keys = parse_jwks(requests.get(a.url + "/.well-known/jwks.json", timeout=5).json())
    claims = verify_token(resp.json()["token"], keys, machine_code=m.code, model_id=model_id)
    assert claims.lic == lic["license_id"]
    assert activate(a, m, model_id).status_code == 200

    resp = a.api("POST", f"/v1/licenses/{lic['license_id']}/revoke", {"reason": "test"})
    assert resp.status_code == 200, resp.text
    for s in (b, a):
        resp = activate(s, m, model_id)
        assert resp.status_code == 403 and resp.json()["error"] == "revoked", resp.text
    # a second revoke through the other replica sees the first one
    assert b.api("POST", f"/v1/licenses/{lic['license_id']}/revoke", {}).status_code == 409
    assert _verify(b)["ok"] is True


def test_concurrent_writes_through_both_keep_one_chain_and_lose_no_update(pair):
    a, b = pair
    before = _verify(a)["checked"]
    machines = [new_machine() for _ in range(16)]
    model_id, _ = add_model(a)

    def register_and_issue(i: int) -> str:
        s = (a, b)[i % 2]
        register(s, machines[i])
        return str(issue((b, a)[i % 2], machines[i], model_id, days=30)["license_id"])

    with ThreadPoolExecutor(8) as pool:
        lic_ids = list(pool.map(register_and_issue, range(len(machines))))
    assert len(set(lic_ids)) == len(machines)

    # Read-modify-write of one license through both replicas at once: every extension lands.
    target = lic_ids[0]
    start = int(a.api("GET", f"/v1/licenses/{target}").json()["expires_at"])
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: (a, b)[i % 2].api("POST", f"/v1/licenses/{target}/extend",
                                                           {"days": 1}).status_code, range(12)))
    assert codes == [200] * 12
    assert int(b.api("GET", f"/v1/licenses/{target}").json()["expires_at"]) == start + 12 * 86_400
    extended = a.api("GET", "/v1/audit", params={"license": target, "type": "license_extended",
                                                 "limit": 100}).json()["items"]
    olds = sorted(rec["old_expires_at"] for rec in extended)
    assert olds == [start + i * 86_400 for i in range(12)]  # one serial order, no lost update

    doc_a, doc_b = _verify(a), _verify(b)
    assert doc_a == doc_b
    assert doc_a["ok"] is True and doc_a["checked"] == before + 1 + 2 * len(machines) + 12
