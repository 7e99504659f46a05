"""REST API against a real gunicorn + Redis: the happy paths and every activation denial."""

from __future__ import annotations

import re
import time
from pathlib import Path

import jwt
import requests
from ls_helpers import activate, add_model, issue, new_machine, register, world

from layerlock.license_server.store import P
from layerlock.shared.keys import b64u_decode
from layerlock.shared.tokens import parse_jwks, verify_token
from layerlock.shared.wrap import MachineKemKeys, binding_info, open_sealed
from tests.conftest import fresh_minute, wait_for

REPO = Path(__file__).resolve().parents[2]


def _jwks(server):
    return parse_jwks(requests.get(server.url + "/.well-known/jwks.json", timeout=5).json())


def test_activation_returns_a_token_whose_wk_opens_to_the_data_key(server):
    m, model_id, data_key, lic = world(server)
    resp = activate(server, m, model_id)
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert set(doc) == {"token", "expires_at", "renew_at", "license_id"}
    claims = verify_token(doc["token"], _jwks(server), machine_code=m.code, model_id=model_id)
    assert claims.lic == lic["license_id"] == doc["license_id"]
    assert claims.exp == doc["expires_at"] and claims.rna == doc["renew_at"]
    assert claims.iat < claims.rna <= claims.exp and claims.nbf == claims.iat
    assert claims.suite == "X25519-SHA256-AES256GCM"
    key = open_sealed(claims.wrapped_key, MachineKemKeys(m.kx).private_for(claims.suite), claims.suite,
                      binding_info(claims.lic, m.code, model_id))
    assert key == data_key
    # the audit has the grant, without the token or wk
    audit = server.api("GET", "/v1/audit", params={"type": "activation", "machine": m.code}).json()["items"]
    assert audit[0]["outcome"] == "granted" and audit[0]["license"] == lic["license_id"]
    assert doc["token"] not in str(audit) and claims.wk not in str(audit)


def test_wk_is_sealed_once_per_license_and_reused_and_still_opens(server):
    """The sealed data key depends only on (license, machine keys, data key): the first grant
    seals it and stores it in the license hash, later grants (any replica) reuse it."""
    m, model_id, data_key, lic = world(server)
    first, second = (verify_token(activate(server, m, model_id).json()["token"], _jwks(server), machine_code=m.code)
                     for _ in range(2))
    assert first.jti != second.jti and first.wk == second.wk
    stored = server.redis().hget(f"{P}license:{lic['license_id']}", "wk_" + first.suite)
    assert stored.endswith(":" + first.wk)
    key = open_sealed(second.wrapped_key, MachineKemKeys(m.kx).private_for(second.suite), second.suite,
                      binding_info(second.lic, m.code, model_id))
    assert key == data_key
    # a cached wk that does not match the machine's current keys is never served
    server.redis().hset(f"{P}license:{lic['license_id']}", "wk_" + first.suite, "0" * 16 + ":" + first.wk)
    third = verify_token(activate(server, m, model_id).json()["token"], _jwks(server), machine_code=m.code)
    assert third.wk != first.wk
    # revoke still works at once (the cache field is no guard of ops' writes) and is reflected
    assert server.api("POST", f"/v1/licenses/{lic['license_id']}/revoke", {"reason": "t"}).status_code == 200
    assert activate(server, m, model_id).json()["error"] == "revoked"


def test_token_lifetimes_follow_license_settings(server):
    m = new_machine()
    register(server, m)
    model_id, _ = add_model(server)
    issue(server, m, model_id, token_ttl=6, offline_grace=9)
    doc = activate(server, m, model_id).json()
    claims = jwt.decode(doc["token"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 9
    assert claims["rna"] - claims["iat"] == 4
    # license expiry caps the token
    m2 = new_machine()
    register(server, m2)
    lic = issue(server, m2, model_id, expires_at=int(time.time()) + 30)
    assert activate(server, m2, model_id).json()["expires_at"] == lic["expires_at"]


def test_policy_picks_chacha_without_aes_and_hybrid_only_with_pq_key(server):
    model_id, _ = add_model(server)
    m = new_machine(aes=False)
    register(server, m)
    issue(server, m, model_id)
    claims = verify_token(activate(server, m, model_id).json()["token"], _jwks(server), machine_code=m.code)
    assert claims.suite == "X25519-SHA256-CHACHA20POLY1305"


def test_denials_each_have_their_reason_principals_audited_the_rest_counted(server):
    """A signed request from an enrolled machine is a principal's act: audited.  Requests that
    prove nothing (unknown machine, forged signature, a replayed or stale capture) are counted
    per hour and reason instead, so an outsider cannot grow the audit trail."""
    fresh_minute()  # the counts are per hour: before and after in the same one
    before = server.api("GET", "/v1/audit/rejections", params={"hours": 1}).json()["totals"]
    m, model_id, _, lic = world(server)
    stranger = new_machine()
    assert activate(server, stranger, model_id).json()["error"] == "unknown_machine"
    assert activate(server, m, "no-such-model").json()["error"] == "unknown_model"
    other_model, _ = add_model(server)
    r = activate(server, m, other_model)
    assert (r.status_code, r.json()["error"]) == (403, "no_license")
    req = m.request(model_id)
    assert requests.post(server.url + "/v1/activate", json=req, timeout=5).status_code == 200
    r = requests.post(server.url + "/v1/activate", json=req, timeout=5)
    assert (r.status_code, r.json()["error"]) == (409, "replay")
    r = requests.post(server.url + "/v1/activate", json=m.request(model_id, now=time.time() - 3600), timeout=5)
    assert (r.status_code, r.json()["error"]) == (401, "stale_request")
    forged = new_machine()
    forged.code = m.code
    r = activate(server, forged, model_id)
    assert (r.status_code, r.json()["error"]) == (401, "bad_signature")
    assert server.api("POST", f"/v1/licenses/{lic['license_id']}/revoke", {"reason": "test"}).status_code == 200
    assert activate(server, m, model_id).json()["error"] == "revoked"
    assert server.api("POST", f"/v1/machines/{m.code}/deactivate").status_code == 200
    assert activate(server, m, model_id).json()["error"] == "machine_inactive"
    reasons = {rec["reason"] for rec in server.api("GET", "/v1/audit", params={
        "type": "activation", "outcome": "denied", "limit": 1000}).json()["items"]}
    assert {"unknown_model", "no_license", "revoked", "machine_inactive"} <= reasons
    assert not {"unknown_machine", "replay", "stale_request", "bad_signature"} & reasons
    after = server.api("GET", "/v1/audit/rejections", params={"hours": 1}).json()["totals"]
    for reason in ("unknown_machine", "replay", "stale_request", "bad_signature"):
        assert after.get(reason, 0) == before.get(reason, 0) + 1, reason


def test_expired_and_not_yet_valid_licenses(server):
    m = new_machine()
    register(server, m)
    model_id, _ = add_model(server)
    issue(server, m, model_id, not_before=int(time.time()) + 3600)
    assert activate(server, m, model_id).json()["error"] == "no_license"
    m2 = new_machine()
    register(server, m2)
    issue(server, m2, model_id, expires_at=int(time.time()) + 5)
    assert activate(server, m2, model_id).status_code == 200
    assert wait_for(lambda: activate(server, m2, model_id).json().get("error") == "expired", timeout=15, step=0.5)


def test_registration_with_enrollment_must_match_the_machine_code(server):
    m, other = new_machine(), new_machine()
    r = server.api("POST", "/v1/machines", {"machine": other.code, "enrollment": m.enrollment})
    assert r.status_code == 400
    r = server.api("POST", "/v1/machines", {"enrollment": m.enrollment})
    assert r.status_code == 201 and r.json()["machine"] == m.code
    assert server.api("POST", "/v1/machines", {"machine": m.code}).status_code == 409


def test_machines_list_filter_paginate_and_labels(server):
    codes = []
    for i in range(5):
        m = new_machine()
        register(server, m, customer="pager", labels={"rack": str(i % 2)})
        codes.append(m.code)
    seen, cursor = [], 0
    while cursor is not None:
        doc = server.api("GET", "/v1/machines", params={"customer": "pager", "limit": 2, "cursor": cursor}).json()
        assert len(doc["items"]) <= 2
        seen += [i["machine"] for i in doc["items"]]
        cursor = doc["next_cursor"]
    assert seen == codes
    rack1 = server.api("GET", "/v1/machines", params={"customer": "pager", "label": "rack=1"}).json()["items"]
    assert [i["machine"] for i in rack1] == codes[1::2]
    r = server.api("PATCH", f"/v1/machines/{codes[0]}", {"labels": {"rack": "9", "dc": "fra"}})
    assert r.status_code == 200 and r.json()["labels"] == {"rack": "9", "dc": "fra"}
    server.api("POST", f"/v1/machines/{codes[0]}/deactivate")
    inactive = server.api("GET", "/v1/machines", params={"customer": "pager", "status": "inactive"}).json()
    assert [i["machine"] for i in inactive["items"]] == [codes[0]]
    assert server.api("POST", f"/v1/machines/{codes[0]}/deactivate").status_code == 409


def test_models_never_return_key_material(server):
    model_id, data_key = add_model(server)
    shown = server.api("GET", f"/v1/models/{model_id}").text
    listed = server.api("GET", "/v1/models").text
    for text in (shown, listed):
        assert "wrapped_key" not in text and "sealed" not in text
    assert server.api("GET", "/v1/intake-key").json()["intake_pub"] == server.intake_pub
    assert server.api("POST", f"/v1/models/{model_id}/retire").json()["status"] == "retired"
    # the KEK-sealed copy in Redis is not the plaintext key
    stored = server.redis().hget(f"{P}model:{model_id}", "wrapped_key")
    assert data_key not in b64u_decode(stored)


def test_license_lifecycle_and_filters(server):
    m, model_id, _, lic = world(server)
    lid = lic["license_id"]
    assert lic["status"] == "active" and lic["customer"] == "acme"
    listed = server.api("GET", "/v1/licenses", params={"machine": m.code}).json()["items"]
    assert [i["license_id"] for i in listed] == [lid]
    ext = server.api("POST", f"/v1/licenses/{lid}/extend", {"days": 10}).json()
    assert ext["expires_at"] == lic["expires_at"] + 10 * 86400
    rev = server.api("POST", f"/v1/licenses/{lid}/revoke", {"reason": "contract ended"}).json()
    assert rev["status"] == "revoked" and rev["revoke_reason"] == "contract ended"
    assert server.api("POST", f"/v1/licenses/{lid}/extend", {"days": 1}).status_code == 409
    assert server.api("POST", f"/v1/licenses/{lid}/revoke", {}).status_code == 409
    revoked = server.api("GET", "/v1/licenses", params={"model": model_id, "status": "revoked"}).json()["items"]
    assert [i["license_id"] for i in revoked] == [lid]
    types = [r["type"] for r in server.api("GET", "/v1/audit", params={"license": lid}).json()["items"]]
    assert types[:3] == ["license_revoked", "license_extended", "license_issued"]


def test_auth_roles(server):
    operator = server.api("POST", "/v1/keys", {"role": "operator", "name": "ci"}).json()
    auditor = server.api("POST", "/v1/keys", {"role": "auditor"}).json()
    assert operator["api_key"].startswith("llk_")
    assert server.api("GET", "/v1/machines", key="").status_code == 401
    assert server.api("GET", "/v1/machines", key="llk_wrong").status_code == 401
    assert server.api("GET", "/v1/machines", key=operator["api_key"]).status_code == 200
    assert server.api("GET", "/v1/audit", key=operator["api_key"]).status_code == 403
    assert server.api("POST", "/v1/keys", {"role": "admin"}, key=operator["api_key"]).status_code == 403
    assert server.api("GET", "/v1/audit", key=auditor["api_key"]).status_code == 200
    assert server.api("GET", "/v1/licenses", key=auditor["api_key"]).status_code == 200
    r = server.api("POST", "/v1/machines", {"machine": new_machine().code}, key=auditor["api_key"])
    assert (r.status_code, r.json()["error"]) == (403, "forbidden")
    listed = server.api("GET", "/v1/keys").text
    assert operator["api_key"] not in listed and server.admin_key not in listed
    assert server.api("POST", f"/v1/keys/{operator['id']}/revoke").status_code == 200
    assert server.api("GET", "/v1/machines", key=operator["api_key"]).status_code == 401
    audit = server.api("GET", "/v1/audit", params={"type": "apikey_created"}).text
    assert operator["api_key"] not in audit


def test_probes_docs_metrics_ping(server):
    assert requests.get(server.url + "/healthz", timeout=5).json() == {"status": "ok"}
    assert requests.get(server.url + "/readyz", timeout=5).status_code == 200
    assert requests.get(server.url + "/v1/ping", timeout=5).json() == {"pong": True}
    doc = requests.get(server.url + "/openapi.json", timeout=5).json()
    assert doc["openapi"].startswith("3.") and "/v1/activate" in doc["paths"]
    assert "openapi.json" in requests.get(server.url + "/docs", timeout=5).text
    m, model_id, _, _ = world(server)
    for _ in range(4):  # several requests so more than one worker likely served one
        activate(server, m, model_id)
    text = requests.get(server.url + "/metrics", timeout=5).text
    granted = [line for line in text.splitlines() if line.startswith('layerlock_activations_total{outcome="granted"}')]
    assert granted and float(granted[0].split()[-1]) >= 4
    assert "layerlock_licenses_issued_total" in text and "layerlock_activation_seconds_bucket" in text


def test_openapi_covers_every_route():
    """The OpenAPI table and the blueprints' routes are the same set (docs pages aside)."""
    from layerlock.license_server.openapi import ROUTES

    documented = {(method, path) for method, path, *_ in ROUTES}
    declared = set()
    for file in (REPO / "license_server" / "api").glob("*.py"):
        text = file.read_text()
        prefix = (re.findall(r'url_prefix="([^"]+)"', text) or [""])[0]
        for method, path in re.findall(r'@bp\.(get|post|patch|delete|put)\("([^"]*)"\)', text):
            declared.add((method, re.sub(r"<([^>]+)>", r"{\1}", prefix + path)))
    assert declared - {("get", "/openapi.json"), ("get", "/docs")} == documented
