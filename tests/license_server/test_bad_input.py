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


# --- regressions from a schemathesis run (every one of these was a 500, or silently accepted) ---

def _rejections(server, requests_: list[tuple[str, str, dict]], status: int = 400) -> list:
    """Send each ``(method, path, kwargs)``; return those not answered ``status`` with a JSON
    ``{"error": str, "message": str}`` body, and assert Redis did not change."""
    r = server.redis()
    before = snapshot(r)
    failures = []
    for method, path, kw in requests_:
        kw = dict(kw)
        expect = kw.pop("expect", None)
        resp = server.api(method, path, **kw)
        try:
            doc = resp.json()
        except ValueError:
            doc = None
        if (resp.status_code != status or not isinstance(doc, dict) or set(doc) != {"error", "message"}
                or not all(isinstance(v, str) for v in doc.values())):
            failures.append((method, path[:80], resp.status_code, resp.text[:200]))
        elif expect and expect not in doc["message"]:
            failures.append((method, path[:80], "message", doc["message"]))
    assert snapshot(r) == before
    return failures


def test_numeric_query_parameters_accept_only_ascii_digits(ctx):
    """``str.isdigit()`` is true for '²' (int() then raised: 500) and for Arabic-Indic digits
    (int() silently accepted them); '--5' passed the lstrip('-') check."""
    lists = ("/v1/machines", "/v1/models", "/v1/licenses", "/v1/keys")
    cases = [(p + "?" + q) for p in lists for q in ("limit=%C2%B2", "cursor=%C2%B2", "limit=%D9%A1%D9%A0",
                                                       "cursor=%D9%A3", "limit=--5", "cursor=--0", "limit=1%C2%B2",
                                                       "cursor=99999999999999999999999", f"cursor={2**53 + 1}",
                                                       "cursor=-1", "limit=%EF%BC%95")]
    cases += ["/v1/audit?limit=%C2%B2", "/v1/audit?limit=%D9%A1", "/v1/audit?limit=--5",
              "/v1/audit/raw?limit=%C2%B2", "/v1/audit/rejections?hours=%C2%B2", "/v1/audit/rejections?hours=--1"]
    failures = _rejections(ctx["server"], [("GET", path, {}) for path in cases])
    assert not failures, failures


@pytest.mark.parametrize("name", ["since", "until"])
def test_audit_time_bounds_must_be_finite_unix_seconds(ctx, name):
    values = ["inf", "-inf", "nan", "Infinity", "1e400", "-1e300", "-1", "1e16", str(2**53 + 2), "%C2%B2",
              "%D9%A1%D9%A0", "1_000", "0x10", "1e", ""]
    failures = _rejections(ctx["server"], [("GET", f"/v1/audit?{name}={v}", {"expect": name}) for v in values])
    assert not failures, failures


def test_audit_cursor_must_be_a_bounded_record_id(ctx):
    values = ["99999999999999999999999-0", "5-99999999999999999999999", "18446744073709551616",
              f"{2**53 + 1}-0", "%C2%B2-0", "1-%C2%B2", "%D9%A1-0", "0-0", "-1", "1--1", "1-2-3"]
    failures = _rejections(ctx["server"], [("GET", f"{path}?cursor={v}", {"expect": "cursor"})
                                           for path in ("/v1/audit", "/v1/audit/raw") for v in values])
    assert not failures, failures


def _deep(depth: int, open_: bytes = b"[", close: bytes = b"]") -> bytes:
    return open_ * depth + close * depth


def test_deeply_nested_json_bodies_are_400_on_every_body_endpoint(ctx):
    """json.loads raised RecursionError (a 500) on a few thousand brackets, well under the size cap."""
    m, lic, server = ctx["m"], ctx["lic"], ctx["server"]
    posts = ["/v1/activate", "/v1/machines", "/v1/models", "/v1/licenses", "/v1/keys",
             f"/v1/licenses/{lic}/revoke", f"/v1/licenses/{lic}/extend", f"/v1/machines/{m.code}/deactivate",
             f"/v1/models/{ctx['model']}/retire", "/v1/keys/key_nope/revoke", "/v1/keys/rotate-signing",
             "/v1/keys/rotate-kek"]
    bodies = [_deep(20_000), b'{"a":' * 6000 + b"1" + b"}" * 6000,
              b'{"machine":' + _deep(3000, b'{"x":[', b"]}") + b"}"]
    headers = {"Content-Type": "application/json"}
    reqs = [("POST", p, {"data": b, "headers": headers, "key": "" if p == "/v1/activate" else None,
                         "expect": "nested"}) for p in posts for b in bodies]
    reqs += [("PATCH", f"/v1/machines/{m.code}", {"data": b, "headers": headers, "expect": "nested"}) for b in bodies]
    failures = _rejections(server, reqs)
    assert not failures, failures


def test_activation_ts_must_be_below_2_53(ctx):
    """A validly signed request whose ts has 401 digits overflowed float arithmetic (a 500); one at
    2**53 was audited as a stale request instead of being refused as malformed."""
    m, model, server = ctx["m"], ctx["model"], ctx["server"]
    reqs = [("POST", "/v1/activate", {"json": m.request(model, now=ts), "key": "", "expect": "ts"})
            for ts in (10**400, 2**53, 2**64)]
    failures = _rejections(server, reqs)
    assert not failures, failures


def test_what_clients_send_is_still_accepted(ctx):
    """The bounds above refuse nothing a client sends: brackets inside strings are not nesting,
    fractional Unix seconds and next_cursor values work, a body at the depth limit parses."""
    server = ctx["server"]
    fresh = new_machine()
    tricky = '[[[{{{"\\' * 20 + "]" * 40
    resp = server.api("POST", "/v1/machines", {"machine": fresh.code, "customer": tricky[:200]})
    assert resp.status_code == 201, resp.text
    assert server.api("GET", f"/v1/machines/{fresh.code}").json()["customer"] == tricky[:200]
    nested: object = "x"
    for _ in range(31):
        nested = [nested]
    resp = server.api("PATCH", f"/v1/machines/{fresh.code}", {"labels": nested})  # depth 32: parsed, then refused
    assert resp.status_code == 400 and "labels" in resp.json()["message"], resp.text
    now = time.time()
    resp = server.api("GET", f"/v1/audit?since={now - 3600:.3f}&until={now + 1}&limit=1")
    assert resp.status_code == 200 and resp.json()["items"], resp.text
    nxt = resp.json()["next_cursor"]
    for path in (f"/v1/audit?cursor={nxt}&since=0", "/v1/audit?cursor=1", "/v1/audit/raw?cursor=0-1",
                 "/v1/machines?limit=%205%20&cursor=0"):
        resp = server.api("GET", path)
        assert resp.status_code == 200, (path, resp.text)
