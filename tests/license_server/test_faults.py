"""Faults against real gunicorn + real Redis: outage, crash durability, concurrent operators."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from ls_helpers import activate, add_model, issue, new_machine, register, world


def test_redis_outage_is_503_with_retry_after_and_recovers_without_restart(license_server, redis_server):
    m, model_id, _, _ = world(license_server)
    redis_server.stop()
    for method, path, body, key in [("GET", "/readyz", None, ""), ("GET", "/v1/machines", None, None),
                                    ("POST", "/v1/licenses", {"machine": m.code, "model": model_id, "days": 1},
                                     None)]:
        t0 = time.monotonic()
        resp = license_server.api(method, path, body, key=key)
        assert time.monotonic() - t0 < 3
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"] == "unavailable" and int(resp.headers["Retry-After"]) > 0
    t0 = time.monotonic()
    resp = requests.post(license_server.url + "/v1/activate", json=m.request(model_id), timeout=10)
    assert resp.status_code == 503 and "Retry-After" in resp.headers and time.monotonic() - t0 < 3
    assert requests.get(license_server.url + "/healthz", timeout=5).status_code == 200
    redis_server.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if activate(license_server, m, model_id).status_code == 200:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("server did not recover after Redis came back")
    assert license_server.api("GET", "/v1/machines").status_code == 200


def test_acknowledged_licenses_survive_sigkill_with_appendfsync_always(license_server, redis_server):
    """``appendfsync always``: a reply is sent only after the write is fsynced to the AOF."""
    m = new_machine()
    register(license_server, m)
    model_id, _ = add_model(license_server)
    issued = [issue(license_server, m, model_id, days=i + 1)["license_id"] for i in range(20)]
    redis_server.kill()  # SIGKILL right after the last acknowledgement
    redis_server.start()
    r = redis_server.client()
    for lid in issued:
        assert r.hget(f"ll:license:{lid}", "machine") == m.code
    deadline = time.monotonic() + 10
    while license_server.api("GET", "/readyz", key="").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    audit_ids = {rec.get("license") for rec in license_server.api(
        "GET", "/v1/audit", params={"type": "license_issued", "limit": 100}).json()["items"]}
    assert set(issued) <= audit_ids
    assert license_server.api("GET", "/v1/audit/verify").json()["ok"] is True


def test_concurrent_revoke_and_extend_end_in_a_serial_order(license_server):
    m = new_machine()
    register(license_server, m)
    model_id, _ = add_model(license_server)
    lics = [issue(license_server, m, model_id, days=10) for _ in range(12)]

    def run(lic):
        barrier = threading.Barrier(2)
        out = {}

        def revoke():
            barrier.wait()
            out["revoke"] = license_server.api("POST", f"/v1/licenses/{lic['license_id']}/revoke", {"reason": "r"})

        def extend():
            barrier.wait()
            out["extend"] = license_server.api("POST", f"/v1/licenses/{lic['license_id']}/extend", {"days": 5})

        threads = [threading.Thread(target=revoke), threading.Thread(target=extend)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return lic, out

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, lics))
    for lic, out in results:
        final = license_server.api("GET", f"/v1/licenses/{lic['license_id']}").json()
        assert out["revoke"].status_code == 200 and final["status"] == "revoked"
        if out["extend"].status_code == 200:  # extend first, then revoke
            assert final["expires_at"] == lic["expires_at"] + 5 * 86400
        else:  # revoke first: extend refused, nothing changed
            assert out["extend"].status_code == 409
            assert final["expires_at"] == lic["expires_at"]
    assert license_server.api("GET", "/v1/audit/verify").json()["ok"] is True


def test_activations_racing_a_revocation_are_serializable(tmp_path, redis_server):
    with own_server(tmp_path, redis_server, LAYERLOCK_RATE_MACHINE_PER_MIN="100000") as srv:
        _race(srv)


def _race(license_server):
    m, model_id, _, lic = world(license_server)
    lid = lic["license_id"]
    stop = threading.Event()
    granted: list[int] = []
    after_revoke: list[requests.Response] = []
    revoked_at = [float("inf")]

    def hammer():
        while not stop.is_set():
            t0 = time.monotonic()
            resp = activate(license_server, m, model_id)
            if resp.status_code == 200:
                granted.append(1)
            if t0 > revoked_at[0]:
                after_revoke.append(resp)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert license_server.api("POST", f"/v1/licenses/{lid}/revoke", {"reason": "race"}).status_code == 200
    revoked_at[0] = time.monotonic()
    time.sleep(0.4)
    stop.set()
    for t in threads:
        t.join()
    assert granted, "no activation happened before the revocation"
    assert after_revoke and all(r.json().get("error") == "revoked" for r in after_revoke)
    final = license_server.api("GET", f"/v1/licenses/{lid}").json()
    assert final["activations"] == len(granted)  # every grant committed before the revoke, none after
    audit = license_server.api("GET", "/v1/audit", params={"license": lid, "limit": 1000}).json()["items"]
    types = [rec["type"] for rec in audit]
    assert types.count("license_revoked") == 1


def test_rate_limit_per_machine(tmp_path, redis_server):
    with own_server(tmp_path, redis_server, LAYERLOCK_RATE_MACHINE_PER_MIN="3") as srv:
        m, model_id, _, _ = world(srv)
        codes = [activate(srv, m, model_id).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
        assert activate(srv, m, model_id).json()["error"] == "rate_limited"
        assert srv.api("GET", "/v1/audit", params={"reason": "rate_limited"}).json()["items"]


@contextlib.contextmanager
def own_server(tmp_path, redis_server, **env):
    """A license server with non-default settings (the shared fixture uses the defaults)."""
    from tests.conftest import LicenseServer

    srv = LicenseServer(tmp_path / "own", redis_server.url, env=env)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
