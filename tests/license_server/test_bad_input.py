"""Bad input never causes a 500 and never changes state (Redis snapshot and audit unchanged)."""

from __future__ import annotations

import json
import time

import pytest
import requests
from ls_helpers import new_machine, snapshot, world

from layerlock.shared.keys import b64u_decode, x25519_public
from layerlock.shared.wrap import seal_for_server


@pytest.fixture(scope="module")
def ctx(server):
    m, model_id, _, lic = world(server)
    return {"m": m, "model": model_id, "lic": lic["license_id"], "server": server}


def _bad_code(code: str) -> str:
    last = code[-1]
    return code[:-1] + ("0" if last != "0" else "1")


def _tampered_enrollment(m) -> str:
    prefix, body, sig = m.enrollment.split(".")
    doc = json.loads(b64u_decode(body))
    doc["device"]["vendor"] = "Evil"
    import base64

    body2 = base64.urlsafe_b64encode(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
    return f"{prefix}.{body2.decode().rstrip('=')}.{sig}"


def _cases(c):
    m, model, lic = c["m"], c["model"], c["lic"]
    fresh = new_machine()
    sealed_other = seal_for_server(b"k" * 32, x25519_public(b64u_decode(c["server"].intake_pub)), "other-model")
    good_req = m.request(model)
    big = "x" * 100_000
    return [
        ("POST", "/v1/machines", b"{not json", 400),
        ("POST", "/v1/machines", [1, 2], 400),
        ("POST", "/v1/machines", {"machine": fresh.code, "colour": "red"}, 400),
        ("POST", "/v1/machines", {"machine": fresh.code, "customer": 5}, 400),
        ("POST", "/v1/machines", {"machine": fresh.code, "labels": ["a"]}, 400),
        ("POST", "/v1/machines", {"machine": _bad_code(fresh.code)}, 400),
        ("POST", "/v1/machines", {"machine": "LLK-12345"}, 400),
        ("POST", "/v1/machines", {"machine": 12345}, 400),
        ("POST", "/v1/machines", {"enrollment": "LLE1.garbage.garbage"}, 400),
        ("POST", "/v1/machines", {"enrollment": _tampered_enrollment(fresh)}, 401),
        ("POST", "/v1/machines", {"machine": m.code}, 409),
        ("POST", "/v1/machines", {"machine": fresh.code, "customer": big}, 413),
        ("PATCH", f"/v1/machines/{m.code}", {}, 400),
        ("PATCH", f"/v1/machines/{m.code}", {"labels": {"a": 1}}, 400),
        ("PATCH", f"/v1/machines/{fresh.code}", {"labels": {}}, 404),
        ("POST", f"/v1/machines/{fresh.code}/deactivate", None, 404),
        ("GET", f"/v1/machines/{_bad_code(m.code)}", None, 400),
        ("GET", f"/v1/machines/{fresh.code}", None, 404),
        ("GET", "/v1/machines?limit=abc", None, 400),
        ("GET", "/v1/machines?limit=0", None, 400),
        ("POST", "/v1/models", {"model_id": "x"}, 400),
        ("POST", "/v1/models", {"model_id": "../etc", "sealed_key": {}}, 400),
        ("POST", "/v1/models", {"model_id": "new-model", "sealed_key": sealed_other}, 400),
        ("POST", "/v1/models", {"model_id": "new-model", "sealed_key": {"v": 1, "model": "new-model",
                                                                      "sealed": "!!"}}, 400),
        ("POST", "/v1/models", {"model_id": "new-model", "sealed_key": "text"}, 400),
        ("POST", "/v1/models/nope/retire", None, 404),
        ("GET", "/v1/models/nope", None, 404),
        ("POST", "/v1/licenses", {"machine": m.code, "model": model, "days": "x"}, 400),
        ("POST", "/v1/licenses", {"machine": m.code, "model": model, "days": 0}, 400),
        ("POST", "/v1/licenses", {"machine": m.code, "model": model, "days": True}, 400),
        ("POST", "/v1/licenses", {"machine": m.code, "model": model, "days": 1, "expires_at": 2**40}, 400),
        ("POST", "/v1/licenses", {"machine": m.code, "model": model}, 400),
        ("POST", "/v1/licenses", {"machine": m.code, "model": model, "expires_at": int(time.time()) - 5}, 400),
        ("POST", "/v1/licenses", {"machine": fresh.code, "model": model, "days": 1}, 404),
        ("POST", "/v1/licenses", {"machine": m.code, "model": "nope", "days": 1}, 404),
        ("POST", "/v1/licenses", {"machine": m.code, "model": model, "days": 1, "token_ttl": 100,
                                  "offline_grace": 50}, 400),
        ("POST", "/v1/licenses", {"machine": m.code, "model": model, "days": 1, "token_ttl": 0}, 400),
        ("POST", "/v1/licenses", {"machine": m.code, "model": model, "days": 1, "seats": 3}, 400),
        ("POST", "/v1/licenses/lic_nope/revoke", {"reason": "x"}, 404),
        ("POST", f"/v1/licenses/{lic}/revoke", {"reason": 7}, 400),
        ("POST", f"/v1/licenses/{lic}/extend", {}, 400),
        ("POST", f"/v1/licenses/{lic}/extend", {"days": -1}, 400),
        ("POST", "/v1/licenses/lic_nope/extend", {"days": 1}, 404),
        ("GET", "/v1/licenses/lic_nope", None, 404),
        ("POST", "/v1/keys", {"role": "root"}, 400),
        ("POST", "/v1/keys/key_nope/revoke", None, 404),
        ("GET", "/v1/audit?cursor=abc", None, 400),
        ("GET", "/v1/audit?since=yesterday", None, 400),
        ("GET", "/v1/nope", None, 404),
        ("DELETE", "/v1/machines", None, 405),
        ("POST", "/v1/activate", b"\xff\xfe", 400),
        ("POST", "/v1/activate", {**good_req, "sig": "AAAA"}, 400),
        ("POST", "/v1/activate", {**good_req, "ts": "now"}, 400),
        ("POST", "/v1/activate", {**good_req, "nonce": "abc"}, 400),
        ("POST", "/v1/activate", {**good_req, "machine": _bad_code(m.code)}, 400),
        ("POST", "/v1/activate", {**good_req, "extra": 1}, 400),
        ("POST", "/v1/activate", {k: v for k, v in good_req.items() if k != "sig"}, 400),
        ("POST", "/v1/activate", {**good_req, "model": "../x"}, 400),
        ("POST", "/v1/activate", {**good_req, "enrollment": big}, 413),
    ]


def test_every_bad_request_is_a_json_4xx_and_changes_nothing(ctx):
    server = ctx["server"]
    r = server.redis()
    before = snapshot(r)
    failures = []
    for method, path, body, status in _cases(ctx):
        kw = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {
            "json": body}
        resp = server.api(method, path, **kw)
        try:
            doc = resp.json()
        except ValueError:
            doc = None
        if resp.status_code != status or not isinstance(doc, dict) or set(doc) != {"error", "message"}:
            failures.append((method, path, status, resp.status_code, resp.text[:200]))
    assert not failures, failures
    assert snapshot(r) == before


def test_chunked_oversized_body_is_413(ctx):
    server = ctx["server"]
    before = snapshot(server.redis())

    def gen():
        for _ in range(100):
            yield b"x" * 1024

    resp = requests.post(server.url + "/v1/machines", data=gen(), timeout=10,
                         headers={"Authorization": f"Bearer {server.admin_key}", "Content-Type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"] == "payload_too_large"
    assert snapshot(server.redis()) == before
