"""Signed webhooks against a real server and a real local HTTP receiver that fails, then recovers."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from ls_helpers import activate, add_model, issue, new_machine, register, world

from layerlock.license_server import events
from layerlock.license_server.cli import main as layerlock_main
from layerlock.license_server.config import ServerConfig
from layerlock.license_server.keystore import KeyStore
from layerlock.license_server.redis_conn import connect
from layerlock.license_server.store import webhooks as store
from layerlock.license_server.store.audit import STREAM
from layerlock.license_server.webhooks import Worker, signature, verify
from tests.conftest import own_stack, wait_for

FAST = {"LAYERLOCK_BACKGROUND_INTERVAL": "0.2", "LAYERLOCK_WEBHOOK_BACKOFF": "0.3",
        "LAYERLOCK_WEBHOOK_BACKOFF_MAX": "1", "LAYERLOCK_WEBHOOK_TIMEOUT": "1"}


class Receiver:
    """A real HTTP endpoint on 127.0.0.1: fails the first ``fail`` requests with 500 (or sleeps
    ``delay`` s), then answers 204; keeps every request's headers and body."""

    def __init__(self, fail: int = 0, delay: float = 0.0) -> None:
        self.fail, self.delay = fail, delay
        self.seen: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with outer.lock:
                    outer.seen.append({"headers": dict(self.headers), "body": body, "t": time.time()})
                    failing = len(outer.seen) <= outer.fail
                if outer.delay:
                    time.sleep(outer.delay)
                self.send_response(500 if failing else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def verified(self, secret: str, seen: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Every request (of ``seen``, a snapshot of :attr:`seen`; default: all so far) whose
        signature verifies, as its parsed event."""
        if seen is None:
            with self.lock:
                seen = list(self.seen)
        out = []
        for req in seen:
            if verify(secret, req["headers"].get("Layerlock-Signature", ""), req["body"]):
                doc = json.loads(req["body"])
                assert req["headers"]["Layerlock-Event-Id"] == doc["id"]
                assert req["headers"]["Layerlock-Event"] == doc["type"]
                out.append(doc)
        return out

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    with own_stack(tmp_path_factory.mktemp("webhooks"), FAST) as ls:
        yield ls


@pytest.fixture()
def quiet(tmp_path):
    """A server whose background worker is off: a test's in-process :class:`Worker` is then the
    only one that ever claims or sends a delivery (no race with the server's own 0.2 s poll)."""
    with own_stack(tmp_path, {**FAST, "LAYERLOCK_BACKGROUND": "false"}) as ls:
        yield ls


@pytest.fixture()
def receiver():
    made: list[Receiver] = []

    def make(**kw: Any) -> Receiver:
        made.append(Receiver(**kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


def _hook(server, url: str, event_types: list[str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"url": url, **({"events": event_types} if event_types else {})}
    resp = server.api("POST", "/v1/webhooks", body)
    assert resp.status_code == 201, resp.text
    return resp.json()


def _disable(server, hook: dict[str, Any]) -> None:
    assert server.api("POST", f"/v1/webhooks/{hook['webhook_id']}/disable").status_code == 200


def test_every_event_arrives_verified_through_failures_and_duplicates_carry_their_id(fast, receiver):
    rcv = receiver(fail=4)  # the endpoint is down for the first four attempts, then recovers
    hook = _hook(fast, rcv.url)
    secret = hook["secret"]
    # license issued, activation granted, activation denied, extended, revoked
    m, model, _, lic = world(fast)
    assert activate(fast, m, model).status_code == 200
    other, _ = add_model(fast)
    assert activate(fast, m, other).status_code == 403
    lid = lic["license_id"]
    assert fast.api("POST", f"/v1/licenses/{lid}/extend", {"days": 5}).status_code == 200
    assert fast.api("POST", f"/v1/licenses/{lid}/revoke", {"reason": "t"}).status_code == 200
    # seats exhausted, seat released, lease culled
    customer = f"wh-{time.time_ns()}"
    a, b = new_machine(), new_machine()
    for x in (a, b):
        register(fast, x, customer=customer)
    pool = fast.api("POST", "/v1/licenses", {"customer": customer, "model": model, "seats": 1, "kind": "floating",
                                             "lease_ttl": 2, "revive_ttl": 0, "token_ttl": 2, "days": 1}).json()
    assert activate(fast, a, model).status_code == 200
    assert activate(fast, b, model).json()["error"] == "seats_exhausted"
    # checkpoint signed (kept: the first one)
    assert fast.api("GET", "/v1/audit/checkpoint").status_code == 200
    want = {"license.issued", "license.extended", "license.revoked", "activation.granted", "activation.denied",
            "seats.exhausted", "lease.culled", "checkpoint.signed"}
    assert want <= set(events.TYPES)

    def arrived() -> set[str]:
        return {e["type"] for e in rcv.verified(secret)}

    assert wait_for(lambda: want <= arrived(), timeout=30), want - arrived()
    with rcv.lock:  # one snapshot: a retry may still arrive meanwhile
        seen = list(rcv.seen)
    got = rcv.verified(secret, seen)
    assert len(got) == len(seen)  # every request that arrived verifies
    culled = [e for e in got if e["type"] == "lease.culled"]
    assert culled[0]["data"]["license"] == pool["license_id"] and culled[0]["data"]["machine"] == a.code
    denied = next(e for e in got if e["type"] == "seats.exhausted")
    assert denied["data"]["machine"] == b.code and denied["id"].endswith(".seats.exhausted")
    # each event is one audit record: ids are evt_<record id>.<type>, stable across retries
    audit_ids = {r["id"] for r in fast.api("GET", "/v1/audit", params={"limit": 1000}).json()["items"]}
    for e in got:
        if e["type"] != "checkpoint.signed":
            assert e["audit_id"] in audit_ids and e["id"] == f"evt_{e['audit_id']}.{e['type']}"
    # the failures were retried: the log shows deliveries that took more than one attempt
    log = fast.api("GET", "/v1/webhooks/deliveries", params={"webhook": hook["webhook_id"], "limit": 1000}).json()
    assert all(d["status"] in ("delivered", "pending") for d in log["items"])
    retried = [d for d in log["items"] if d["attempts"] > 1 and d["status"] == "delivered"]
    assert retried and all(d["last_status"] == 204 for d in retried)
    # a replay sends the same event again: the receiver sees a duplicate it can drop by id
    one = retried[0]
    before = Counter(e["id"] for e in rcv.verified(secret))[one["event_id"]]
    out = CliRunner().invoke(layerlock_main, ["webhooks", "replay", one["delivery_id"], "--json", "--server",
                                              fast.url, "--api-key", fast.admin_key])
    assert out.exit_code == 0, out.output
    assert wait_for(lambda: Counter(e["id"] for e in rcv.verified(secret))[one["event_id"]] == before + 1)
    replayed = fast.api("GET", "/v1/audit", params={"type": "webhook_replayed"}).json()["items"][0]
    assert replayed["delivery"] == one["delivery_id"] and replayed["actor"]
    _disable(fast, hook)
    assert fast.api("GET", "/v1/audit/verify").json()["ok"]


def test_a_slow_endpoint_never_delays_an_activation(fast, receiver):
    rcv = receiver(delay=3)  # longer than the delivery timeout: every delivery hangs, then fails
    hook = _hook(fast, rcv.url, ["activation.granted"])
    m, model, _, _ = world(fast)
    lat = []
    for _ in range(20):
        t0 = time.perf_counter()
        assert activate(fast, m, model).status_code == 200
        lat.append(time.perf_counter() - t0)
    # a delivery takes >= 1 s (its timeout): activations that waited for one would have a median
    # over 1 s (no bound on the max: one slow answer on a loaded CI box proves nothing either way)
    assert statistics.median(lat) < 0.5, lat
    assert wait_for(lambda: len(rcv.seen) >= 3, timeout=20)
    _disable(fast, hook)


def test_secrets_are_sealed_at_rest_shown_once_and_http_only_for_loopback(fast, receiver):
    hook = _hook(fast, receiver().url)
    r = fast.redis()
    stored = r.hgetall(store.key(hook["webhook_id"]))
    assert stored["secret"] != hook["secret"] and hook["secret"] not in json.dumps(stored)
    assert all(hook["secret"] not in str(r.dump(k)) for k in r.scan_iter(count=1000))
    shown = fast.api("GET", f"/v1/webhooks/{hook['webhook_id']}").json()
    assert "secret" not in shown and shown["url"] == hook["url"]
    assert hook["secret"] not in json.dumps(fast.api("GET", "/v1/audit", params={"limit": 1000}).json())
    for url, ok in (("http://example.com/h", False), ("ftp://127.0.0.1/h", False),
                    ("https://ops:pw@hooks.example.com/h", False),  # would be audited for ever, and shown
                    ("https://hooks.example.com/h", True), ("http://[::1]:9/h", True), ("http://localhost:9/h", True)):
        before = r.zcard(store.ALL), r.xlen(STREAM)
        resp = fast.api("POST", "/v1/webhooks", {"url": url, "events": ["license.issued"]})
        assert (resp.status_code == 201) is ok, (url, resp.text)
        if ok:
            _disable(fast, resp.json())
        else:  # refused: 400, and nothing stored or audited
            assert resp.status_code == 400 and (r.zcard(store.ALL), r.xlen(STREAM)) == before, resp.text
    assert fast.api("POST", "/v1/webhooks", {"url": receiver().url, "events": ["nope"]}).status_code == 400
    # a receiver that takes a token in the query: deliveries use it, readers and the audit never see it
    tokened = _hook(fast, "https://hooks.example.com/in?token=QTOKEN42", ["license.issued"])
    assert tokened["url"] == "https://hooks.example.com/in"
    assert r.hget(store.key(tokened["webhook_id"]), "url").endswith("?token=QTOKEN42")
    assert "QTOKEN42" not in json.dumps(fast.api("GET", "/v1/webhooks").json())
    assert "QTOKEN42" not in json.dumps(fast.api("GET", "/v1/audit", params={"type": "webhook_created"}).json())
    _disable(fast, tokened)
    _disable(fast, hook)


def test_a_disabled_endpoint_gets_nothing_and_rotating_the_kek_keeps_secrets_usable(fast, receiver):
    rcv = receiver()
    hook = _hook(fast, rcv.url, ["license.issued"])
    assert fast.api("POST", "/v1/keys/rotate-kek").status_code == 200  # the secret is re-sealed under the new KEK
    m = new_machine()
    register(fast, m)
    model, _ = add_model(fast)
    issue(fast, m, model)
    assert wait_for(lambda: rcv.verified(hook["secret"]), timeout=15)
    _disable(fast, hook)
    n = len(rcv.seen)
    issue(fast, m, model)
    time.sleep(1.5)
    assert len(rcv.seen) == n


def test_non_admins_cannot_see_or_register_webhooks(fast):
    key = fast.api("POST", "/v1/keys", {"role": "operator"}).json()["api_key"]
    assert fast.api("GET", "/v1/webhooks", key=key).status_code == 403
    assert fast.api("POST", "/v1/webhooks", {"url": "https://x.example/h"}, key=key).status_code == 403
    assert requests.get(fast.url + "/v1/webhooks/deliveries", timeout=5).status_code == 401


def test_backoff_doubles_and_a_delivery_fails_for_good_after_the_retry_window(quiet, receiver):
    """The worker in-process, the only one: the server's own is off."""
    rcv = receiver(fail=10_000)
    hook = _hook(quiet, rcv.url, ["license.issued"])
    cfg = ServerConfig(data_dir=quiet.data_dir, redis_url=quiet.redis_url, webhook_backoff=10, webhook_backoff_max=40,
                       webhook_retry_for=86_400)
    assert ServerConfig().webhook_retry_for >= 24 * 3600  # the default retries for at least a day
    worker = Worker(cfg, connect(quiet.redis_url, 2), KeyStore(quiet.data_dir / "keys", max_token_life=3600))
    deliveries = store.Deliveries(quiet.redis())
    m = new_machine()
    register(quiet, m)
    model, _ = add_model(quiet)
    issue(quiet, m, model)
    worker.fan_out(time.time())
    (d,) = [d for d in deliveries.page(cursor=None, limit=50, keep=lambda d: True)[0]
            if d["webhook"] == hook["webhook_id"]]
    ident = d["delivery_id"]
    r = quiet.redis()
    for attempt, base in ((1, 10), (2, 20), (3, 40), (4, 40)):
        assert int(deliveries.get(ident).get("attempts", "0")) == attempt - 1
        worker._send(ident)  # sends whatever it is given, due or not
        rec = deliveries.get(ident)
        delay = float(rec["next_at"]) - float(rec["last_attempt_at"])
        assert 0.8 * base <= delay <= 1.2 * base, (attempt, delay)
        assert r.zscore(store.QUEUE, ident) == pytest.approx(float(rec["next_at"]), abs=0.01)
    assert len(rcv.seen) == 4  # one request per attempt: nobody else sent it
    r.hset(store.delivery_key(ident), "window_from", str(time.time() - 86_401))
    worker._send(ident)
    rec = deliveries.get(ident)
    assert rec["status"] == "failed" and r.zscore(store.QUEUE, ident) is None
    worker.close()


def test_the_signature_scheme(fast):
    body = b'{"id":"evt_1-0.license.issued"}'
    header = signature("whsec_x", body, int(time.time()))
    assert verify("whsec_x", header, body)
    assert not verify("whsec_y", header, body) and not verify("whsec_x", header, body + b" ")
    old = signature("whsec_x", body, int(time.time()) - 600)
    assert not verify("whsec_x", old, body)  # a capture replayed later is refused by its timestamp
