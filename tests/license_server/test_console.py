"""The ops console (``/console/``) against a real gunicorn + Redis: sign-in and sessions, CSRF,
roles exactly as on the REST API, writes that are the REST writes, escaping, secrets shown once.

The browser tests (tests/e2e/test_console_browser.py) drive the same pages in Chromium; here a
small client plays the browser: it keeps cookies itself because ``requests`` (like
``http.cookiejar``) never sends a ``Secure`` cookie over plain http, which browsers do for
http://127.0.0.1.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
import time
from html.parser import HTMLParser
from typing import Any

import pytest
import requests
from ls_helpers import add_model, issue, new_machine, register

from layerlock.license_server.console import dashboard, ops, sessions

PAGES = ("/console/", "/console/machines", "/console/licenses", "/console/models", "/console/audit",
         "/console/audit/verify", "/console/keys")
#: Form actions that change licensing state (the checkpoint form is an auditor's read, as on REST).
WRITE_ACTIONS = re.compile(r'action="/console/(machines/register|machines/[^"]+/(de|re)activate|licenses/issue|'
                           r'licenses/[^"]+/(extend|revoke)|models/[^"]+/retire|keys/create|keys/[^"]+/revoke)"')


class Console:
    """A browser stand-in for the console: cookies by hand, redirects followed like a browser."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.cookies: dict[str, str] = {}
        self.set_cookies: list[str] = []
        self.last: requests.Response | None = None

    def _store(self, resp: requests.Response) -> None:
        for header in resp.raw.headers.getlist("Set-Cookie"):
            self.set_cookies.append(header)
            name, _, rest = header.partition("=")
            if "Max-Age=0" in header or "01 Jan 1970" in header:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = rest.split(";", 1)[0]

    def request(self, method: str, path: str, *, follow: bool = True, **kw: Any) -> requests.Response:
        headers = dict(kw.pop("headers", {}))
        while True:
            if self.cookies:
                headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
            resp = requests.request(method, self.url + path, headers=headers, allow_redirects=False, timeout=15, **kw)
            self._store(resp)
            if not (follow and resp.status_code in (302, 303)):
                break
            method, path, kw = "GET", resp.headers["Location"].removeprefix(self.url), {}
            headers = {}
        self.last = resp
        return resp

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.request("GET", path, **kw)

    def csrf(self) -> str:
        assert self.last is not None
        m = re.search(r'name="csrf" value="([^"]+)"', self.last.text)
        assert m, "no CSRF field on the page"
        return m.group(1)

    def post(self, path: str, data: dict[str, str], *, csrf: bool = True, **kw: Any) -> requests.Response:
        if csrf and "csrf" not in data:
            data = {**data, "csrf": self.csrf()}
        return self.request("POST", path, data=data, **kw)

    def sign_in(self, key: str) -> requests.Response:
        self.get("/console/login")
        resp = self.post("/console/login", {"api_key": key})
        assert resp.status_code == 200 and "Sign out" in resp.text, resp.text[:500]
        return resp


def console(server: Any, key: str | None = None) -> Console:
    c = Console(server.url)
    c.sign_in(key or server.admin_key)
    return c


def new_key(server: Any, role: str) -> dict[str, Any]:
    resp = server.api("POST", "/v1/keys", {"role": role, "name": f"{role} for console tests"})
    assert resp.status_code == 201, resp.text
    return resp.json()  # type: ignore[no-any-return]


def audit_len(server: Any) -> int:
    return int(server.redis().xlen("{ll}:audit"))


def last_record(server: Any) -> dict[str, Any]:
    (_, entry), = server.redis().xrevrange("{ll}:audit", count=1)
    return json.loads(entry["rec"])  # type: ignore[no-any-return]


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    p = _Tags()
    p.feed(html)
    return p.tags


# --- sign-in, session, headers -----------------------------------------------------------------
def test_signin_sets_a_strict_secure_httponly_session_cookie_and_stores_only_its_hash(server):
    c = Console(server.url)
    resp = c.get("/console/machines")
    assert resp.status_code == 200 and "Sign in" in resp.text  # redirected to the sign-in page
    assert "next=/console/machines" in resp.url
    c.post("/console/login", {"api_key": server.admin_key, "next": "/console/machines"})
    assert c.last is not None and c.last.url.endswith("/console/machines") and "Machines" in c.last.text
    cookie = next(h for h in c.set_cookies if h.startswith(sessions.COOKIE + "="))
    attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert {"secure", "httponly", "path"} <= attrs and "SameSite=Strict" in cookie and "Path=/console" in cookie
    sid = c.cookies[sessions.COOKIE]
    r = server.redis()
    assert not r.exists(sessions.PREFIX + sid)
    stored = r.hgetall(sessions.PREFIX + hashlib.sha256(sid.encode()).hexdigest())
    assert stored["key_id"].startswith("key_") and server.admin_key not in json.dumps(stored)
    # nor the CSRF token every form carries: derived from the id, stored nowhere (not in the AOF)
    assert c.csrf() == sessions.csrf_token(sid) and c.csrf() not in json.dumps(stored) and sid not in json.dumps(stored)
    assert 0 < r.ttl(sessions.PREFIX + hashlib.sha256(sid.encode()).hexdigest()) <= sessions.IDLE_SECONDS


def test_every_page_sends_a_strict_csp_and_has_no_inline_script_style_or_handler(server):
    c = console(server)
    for path in (*PAGES, "/console/login"):
        resp = c.get(path)
        assert resp.status_code == 200, (path, resp.text[:300])
        csp = resp.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert resp.headers["X-Content-Type-Options"] == "nosniff" and resp.headers["Cache-Control"] == "no-store"
        for tag, attrs in tags(resp.text):
            assert tag != "style", path
            assert tag != "script" or attrs.get("src"), (path, "inline script")
            assert "style" not in attrs, (path, tag, attrs)
            assert not any(a.startswith("on") for a in attrs), (path, tag, attrs)
            assert not str(attrs.get("href", "")).startswith("javascript:"), path
    css = c.get("/console/static/console.css")
    assert css.status_code == 200 and "text/css" in css.headers["Content-Type"]
    assert c.get("/console/static/console.js").status_code == 200


def test_wrong_key_forged_signin_and_foreign_next_are_refused(server):
    c = Console(server.url)
    c.get("/console/login")
    resp = c.post("/console/login", {"api_key": "llk_" + "x" * 43})
    assert resp.status_code == 401 and "Unknown or revoked API key" in resp.text
    assert sessions.COOKIE not in c.cookies
    # no double-submit cookie: a sign-in form posted from elsewhere
    resp = requests.post(server.url + "/console/login", data={"api_key": server.admin_key, "csrf": "x"},
                         allow_redirects=False, timeout=10)
    assert resp.status_code == 400 and sessions.COOKIE + "=" not in resp.headers.get("Set-Cookie", "")
    c.get("/console/login")
    resp = c.post("/console/login", {"api_key": server.admin_key, "next": "//evil.example/x"}, follow=False)
    assert resp.status_code == 303 and resp.headers["Location"].endswith("/console/")
    rejected = server.api("GET", "/v1/audit/rejections?hours=1").json()["totals"]
    assert rejected.get("console_sign_in", 0) >= 1  # counted like other unauthenticated refusals


def test_sign_out_idle_expiry_and_revoking_the_key_end_the_session(server):
    c = console(server)
    sid = c.cookies[sessions.COOKIE]
    c.get("/console/")
    c.post("/console/logout", {})
    assert c.last is not None and "You are signed out" in c.last.text
    stale = Console(server.url)
    stale.cookies[sessions.COOKIE] = sid
    assert "Sign in" in stale.get("/console/").text

    c = console(server)
    k = sessions.PREFIX + hashlib.sha256(c.cookies[sessions.COOKIE].encode()).hexdigest()
    server.redis().hset(k, "seen", str(int(time.time()) - sessions.IDLE_SECONDS - 1))
    resp = c.get("/console/licenses")
    assert "Your session expired" in resp.text and not server.redis().exists(k)

    key = new_key(server, "operator")
    c = console(server, key["api_key"])
    assert c.get("/console/licenses").status_code == 200
    assert server.api("POST", f"/v1/keys/{key['id']}/revoke").status_code == 200
    assert "was revoked" in c.get("/console/licenses").text


# --- CSRF and roles ----------------------------------------------------------------------------
def test_posts_without_the_session_csrf_token_or_from_another_site_change_nothing(server):
    m = new_machine()
    register(server, m)
    c = console(server)
    c.get("/console/machines")
    before = audit_len(server)
    for data, headers in (({}, {}), ({"csrf": "forged"}, {}), ({"csrf": c.csrf()}, {"Sec-Fetch-Site": "cross-site"})):
        resp = c.request("POST", f"/console/machines/{m.code}/deactivate", data={**data, "confirmed": "yes"},
                         headers=headers)
        assert resp.status_code == 403 and "nothing was changed" in resp.text
    other = console(server)  # another session's token is not this session's
    resp = other.post(f"/console/machines/{m.code}/deactivate", {"csrf": c.csrf(), "confirmed": "yes"})
    assert resp.status_code == 403
    assert audit_len(server) == before
    assert server.api("GET", f"/v1/machines/{m.code}").json()["status"] == "active"


def test_auditor_sees_no_write_controls_and_a_forged_write_is_refused(server):
    m = new_machine()
    register(server, m)
    model_id, _ = add_model(server)
    lic = issue(server, m, model_id)
    c = console(server, new_key(server, "auditor")["api_key"])
    for path in PAGES[:-1]:
        text = c.get(path).text
        assert not WRITE_ACTIONS.search(text), (path, WRITE_ACTIONS.search(text))
    assert c.get("/console/keys").status_code == 403
    c.get("/console/licenses")
    before = audit_len(server)
    for path, data in ((f"/console/licenses/{lic['license_id']}/revoke", {"reason": "x", "confirmed": "yes"}),
                       (f"/console/licenses/{lic['license_id']}/revoke", {"reason": "x"}),  # confirm page too
                       ("/console/licenses/issue", {"machine": m.code, "model": model_id, "days": "3"}),
                       (f"/console/machines/{m.code}/deactivate", {"confirmed": "yes"}),
                       (f"/console/models/{model_id}/retire", {"confirmed": "yes"}),
                       ("/console/keys/create", {"role": "admin"})):
        resp = c.post(path, data)
        assert resp.status_code == 403 and "Not allowed" in resp.text, (path, resp.status_code)
    assert audit_len(server) == before
    assert server.api("GET", f"/v1/licenses/{lic['license_id']}").json()["status"] == "active"

    op = console(server, new_key(server, "operator")["api_key"])
    nav = op.get("/console/").text
    assert 'href="/console/audit"' not in nav and 'href="/console/keys"' not in nav
    assert op.get("/console/audit").status_code == 403 and op.get("/console/keys").status_code == 403


#: REST method and path per console action (placeholders for ids: a refused role gets 403 before
#: any lookup; an admitted one gets something else, typically 404 or 400).
REST = {
    "machine.register": ("POST", "/v1/machines"), "machine.deactivate": ("POST", "/v1/machines/{m}/deactivate"),
    "machine.reactivate": ("POST", "/v1/machines/{m}/reactivate"), "license.issue": ("POST", "/v1/licenses"),
    "license.extend": ("POST", "/v1/licenses/lic_nope/extend"),
    "license.revoke": ("POST", "/v1/licenses/lic_nope/revoke"),
    "model.retire": ("POST", "/v1/models/nope-1/retire"), "key.create": ("POST", "/v1/keys"),
    "key.revoke": ("POST", "/v1/keys/key_nope/revoke"), "audit.list": ("GET", "/v1/audit"),
    "audit.verify": ("GET", "/v1/audit/verify"), "audit.checkpoint": ("GET", "/v1/audit/checkpoint"),
    "audit.checkpoints": ("GET", "/v1/audit/checkpoints"), "audit.rejections": ("GET", "/v1/audit/rejections"),
}


def test_console_roles_are_the_rest_apis_for_every_action(server):
    assert set(REST) == set(ops.ACTIONS)
    keys = {role: new_key(server, role)["api_key"] for role in ("operator", "auditor")} | {"admin": server.admin_key}
    code = new_machine().code
    for action, (method, path) in REST.items():
        for role, key in keys.items():
            body = {"machine": code} if action == "machine.register" and role == "auditor" else {"x": 1}
            status = server.api(method, path.format(m=code), body if method == "POST" else None, key=key).status_code
            assert (status != 403) == ops.may(action, role), (action, role, status)


# --- writes ------------------------------------------------------------------------------------
def test_issue_extend_revoke_from_the_console_are_the_rest_writes_audited_with_the_key_id(server):
    m = new_machine()
    register(server, m, customer="console-co")
    model_id, _ = add_model(server)
    ref = issue(server, m, model_id, days=10)  # the same operations through REST, for comparison
    rest_issued = last_record(server)
    server.api("POST", f"/v1/licenses/{ref['license_id']}/extend", {"days": 5})
    rest_extended = last_record(server)
    server.api("POST", f"/v1/licenses/{ref['license_id']}/revoke", {"reason": "ref"})
    rest_revoked = last_record(server)

    op = new_key(server, "operator")
    c = console(server, op["api_key"])
    c.get("/console/licenses")
    resp = c.post("/console/licenses/issue",
                  {"machine": m.code, "model": model_id, "days": "10", "notes": "via console"})
    assert resp.status_code == 200 and "License issued" in resp.text
    issued = last_record(server)
    assert issued["type"] == "license_issued" and issued["actor"] == op["id"] and set(issued) == set(rest_issued)
    lic_id = issued["license"]
    assert lic_id in resp.text and "via console" in resp.text
    lic = server.api("GET", f"/v1/licenses/{lic_id}").json()
    assert lic["customer"] == "console-co" and lic["expires_at"] - lic["not_before"] == 10 * 86400

    resp = c.post(f"/console/licenses/{lic_id}/extend", {"days": "5"})
    assert "extended by 5 days" in resp.text
    extended = last_record(server)
    assert extended["type"] == "license_extended" and extended["actor"] == op["id"]
    assert set(extended) == set(rest_extended) and extended["expires_at"] - extended["old_expires_at"] == 5 * 86400

    # without JavaScript a revoke first shows a confirmation page and changes nothing
    before = audit_len(server)
    resp = c.post(f"/console/licenses/{lic_id}/revoke", {"reason": "customer left"})
    assert resp.status_code == 200 and "Revoke license?" in resp.text and "customer left" in resp.text
    assert audit_len(server) == before
    confirm = re.search(r'<form method="post" action="([^"]+)"', resp.text.split("<main", 1)[1])
    assert confirm and confirm.group(1) == f"/console/licenses/{lic_id}/revoke"
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', resp.text.split("<main", 1)[1]))
    assert fields["confirmed"] == "yes" and fields["reason"] == "customer left"
    resp = c.post(f"/console/licenses/{lic_id}/revoke", fields)
    assert f"License {lic_id} revoked" in resp.text
    revoked = last_record(server)
    assert revoked["type"] == "license_revoked" and revoked["actor"] == op["id"] and set(revoked) == set(rest_revoked)
    assert revoked["reason"] == "customer left"
    assert server.api("GET", f"/v1/licenses/{lic_id}").json()["status"] == "revoked"

    # a refusal from the REST layer is shown, not a crash: revoking twice
    resp = c.post(f"/console/licenses/{lic_id}/revoke", {"reason": "again", "confirmed": "yes"})
    assert "already revoked" in resp.text and audit_len(server) == before + 1
    resp = c.post("/console/licenses/issue", {"machine": m.code, "model": model_id, "days": "0"})
    assert "days must be" in resp.text


def test_machine_register_deactivate_and_model_retire(server):
    c = console(server)
    c.get("/console/machines")
    m = new_machine()
    resp = c.post("/console/machines/register", {"enrollment": m.enrollment, "customer": "globex",
                                                 "labels": "site=berlin, rack=4"})
    assert "Machine registered" in resp.text and m.code in resp.text
    got = server.api("GET", f"/v1/machines/{m.code}").json()
    assert got["enrolled"] and got["labels"] == {"site": "berlin", "rack": "4"} and got["customer"] == "globex"
    assert c.get("/console/machines?q=BERLIN").text.count(m.code) >= 1
    assert m.code not in c.get("/console/machines?q=nomatch-xyz").text
    resp = c.post(f"/console/machines/{m.code}/deactivate", {"confirmed": "yes"})
    assert f"Machine {m.code} deactivated" in resp.text
    assert server.api("GET", f"/v1/machines/{m.code}").json()["status"] == "inactive"
    assert last_record(server)["actor"].startswith("key_bootstrap_")
    model_id, _ = add_model(server)
    c.get("/console/models")
    resp = c.post(f"/console/models/{model_id}/retire", {"confirmed": "yes"})
    assert f"Model {model_id} retired" in resp.text
    assert server.api("GET", f"/v1/models/{model_id}").json()["status"] == "retired"


def test_hostile_labels_and_names_render_as_text(server):
    m = new_machine()
    evil = "<script>alert(1)</script>"
    quote = '"><img src=x onerror=alert(2)>'
    register(server, m, customer=quote, labels={"note": evil, evil: "x"})
    model_id, _ = add_model(server)
    lic = issue(server, m, model_id, notes=evil)
    key = server.api("POST", "/v1/keys", {"role": "auditor", "name": evil}).json()
    c = console(server)
    for path in ("/console/machines", "/console/licenses", f"/console/audit?machine={m.code}", "/console/keys"):
        text = c.get(path).text
        assert evil not in text and "<img src=x" not in text, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text or "&#34;&gt;&lt;img" in text, path
    assert lic["license_id"] in c.get("/console/licenses").text and key["id"] in c.get("/console/keys").text


def test_a_new_api_key_is_shown_once_and_never_stored_or_rendered_again(server):
    c = console(server)
    c.get("/console/keys")
    resp = c.post("/console/keys/create", {"role": "auditor", "name": "console-made"})
    assert resp.status_code == 200 and "shown this once" in resp.text
    secret = re.search(r'<code id="new-key" class="secret">(llk_[A-Za-z0-9_-]+)</code>', resp.text).group(1)
    assert resp.headers["Cache-Control"] == "no-store"
    me = server.api("GET", "/v1/keys", key=secret)
    assert me.status_code == 403  # a working auditor key (keys are admin-only)
    assert server.api("GET", "/v1/licenses", key=secret).status_code == 200
    created = last_record(server)
    assert created["type"] == "apikey_created" and created["actor"].startswith("key_bootstrap_")
    assert secret not in c.get("/console/keys").text
    r = server.redis()
    for k in r.scan_iter("{ll}:*", count=1000):
        kind = r.type(k)
        dump = json.dumps(r.hgetall(k) if kind == "hash" else r.xrange(k) if kind == "stream" else
                          r.get(k) if kind == "string" else "")
        assert secret not in dump, k
    # the console cannot revoke the key it is signed in with (the REST rule)
    mine = re.search(r'<span class="who-name" title="API key ([^"]+)"', resp.text).group(1)
    assert f"/console/keys/{mine}/revoke" not in c.get("/console/keys").text


# --- dashboard and audit -----------------------------------------------------------------------
def test_dashboard_counts_chart_chain_and_checkpoint(server):
    c = console(server)
    text = c.get("/console/").text
    machines = server.redis().zcard("{ll}:machines")
    assert re.search(rf'<span class="card-label">Machines</span><span class="card-value">{machines}</span>', text)
    assert '<svg class="chart"' in text and "Chain intact" in text
    c.post("/console/audit/checkpoint", {})
    text = c.get("/console/").text
    cps = server.api("GET", "/v1/audit/checkpoints").json()["items"]
    assert cps and str(cps[0]["checkpoint"]["size"]) in text and cps[0]["checkpoint"]["head"][:24] in text
    verify = c.get("/console/audit/verify").text
    assert "Chain intact" in verify and "signed checkpoint" in verify


def test_audit_page_filters_paginates_and_links_each_record_to_its_predecessor(server):
    m = new_machine()
    register(server, m)
    model_id, _ = add_model(server)
    for _ in range(50):  # more than one page
        issue(server, m, model_id)
    c = console(server)
    stored = {sid: e["h"] for sid, e in server.redis().xrevrange("{ll}:audit", count=500)}
    first = c.get("/console/audit").text
    rows = re.findall(r'<li class="rec" id="h-([0-9a-f]{64})">.*?#([0-9]+-[0-9]+)</span>', first, re.S)
    assert len(rows) == first.count('<li class="rec"') == 50
    for h, sid in rows:
        assert stored[sid] == h  # the hash shown is the stored record hash
    # unfiltered, each record's previous-hash link points at the next row down
    for (h_newer, _), (h_older, _) in zip(rows, rows[1:], strict=False):
        assert f'href="#h-{h_older}"' in first.split(f'id="h-{h_newer}"', 1)[1].split("</li>", 1)[0]
    older = re.search(r'href="/console/audit\?cursor=([0-9-]+)">Older', first)
    assert older
    second = c.get(f"/console/audit?cursor={older.group(1)}").text
    rows2 = re.findall(r'<li class="rec" id="h-([0-9a-f]{64})">', second)
    assert rows2 and not set(rows2) & {h for h, _ in rows}
    only = c.get(f"/console/audit?type=machine_registered&machine={m.code}").text
    assert only.count('<li class="rec"') == 1 and "license_issued</span>" not in only
    since = time.strftime("%Y-%m-%dT%H:%M", time.gmtime(time.time() + 3600))
    assert "No records match" in c.get(f"/console/audit?since={since}").text
    assert "must be a date" in c.get("/console/audit?since=yesterday").text


def test_activation_chart_buckets_and_axis():
    now = 1_800_000_000.0 + 1800  # mid-hour
    recs = [{"ts": now - 10, "outcome": "granted"}, {"ts": now - 20, "outcome": "denied", "reason": "expired"},
            {"ts": now - 3 * 3600, "outcome": "granted"}, {"ts": now - 25 * 3600, "outcome": "granted"}]
    chart = dashboard.activations(recs, now=now)
    assert (chart.granted, chart.denied, chart.peak) == (2, 1, 2) and chart.denied_by_reason == {"expired": 1}
    assert [h["granted"] + h["denied"] for h in chart.hours][-4:] == [1, 0, 0, 2]
    assert all(h["gy"] + h["gh"] == pytest.approx(chart.height - chart.bottom) for h in chart.hours)
    assert [dashboard._nice(p) for p in (0, 1, 3, 4, 7, 10, 11, 45, 95, 120)] == [2, 2, 4, 4, 10, 10, 20, 50, 100, 200]
    assert dashboard.bars({"a": 1, "b": 4}) == [{"reason": "b", "count": 4, "pct": 100},
                                               {"reason": "a", "count": 1, "pct": 25}]


def test_every_console_action_is_a_rest_view_behind_require():
    """ops.py calls REST views by endpoint name, unwrapped from ``require``: each must exist."""
    for action in ops.ACTIONS.values():
        bp_name, fn = action.endpoint.split(".")
        mod = importlib.import_module(f"layerlock.license_server.api.{bp_name}")
        view = getattr(mod, fn)
        assert mod.bp.name == bp_name and inspect.unwrap(view) is not view, action
