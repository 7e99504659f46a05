"""The background worker: webhook deliveries (signed, retried, logged) and lease culling.

Where it runs: ``layerlock webhooks run``, a process of its own, which the gunicorn master
starts and supervises (``gunicorn_conf.py``: restarted if it dies, stopped with the server), so
``layerlock serve``, the systemd unit and the tests all get one per server.  Request handling
never waits for it: a commit only pushes the audit record's id onto the outbox
(:mod:`layerlock.license_server.store.outbox`), so a slow or failing endpoint never delays an
activation.  Several workers (one per replica) are safe: fan-out pops the outbox under a guard,
and a delivery is claimed before it is sent; a worker that dies mid-send leaves its claim to
expire, so delivery is *at least once* — receivers drop duplicates by event id.  Set
``LAYERLOCK_BACKGROUND=false`` to run the worker elsewhere (once per deployment is enough).

Each pass: cull lapsed leases (:func:`layerlock.license_server.store.seats.cull`); fan every
queued event out to the endpoints subscribed to it (one delivery each); send the deliveries
that are due, a few at a time in a thread pool.  A failed attempt (no answer within
``webhook_timeout``, a non-2xx status, a redirect) is retried after ``webhook_backoff`` s,
doubling up to ``webhook_backoff_max``, with ±20 % jitter, until ``webhook_retry_for`` (26 h)
has passed since the delivery was queued (or replayed): then it is marked ``failed``.

A delivery is a POST of the event as JSON::

    {"id": "evt_<audit id>.<type>", "type": "license.revoked", "created": <Unix s>,
     "audit_id": "<audit record id>", "data": {<the audit record's fields>}}

with ``Layerlock-Event``, ``Layerlock-Event-Id``, ``Layerlock-Delivery`` and
``Layerlock-Signature: t=<Unix s>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`` (Stripe's
scheme; ``t`` is the attempt's time, so a receiver rejects old captures).  Verify it like this
(or with :func:`verify` itself)::

    import hashlib, hmac, time

    def verify(secret: str, header: str, body: bytes, tolerance: int = 300) -> bool:
        parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
        t, sig = parts.get("t", ""), parts.get("v1", "")
        if not t.isdigit() or abs(time.time() - int(t)) > tolerance:
            return False
        mac = hmac.new(secret.encode(), t.encode() + b"." + body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(mac, sig)

Endpoints must be ``https://``; ``http://`` is accepted only for a loopback host (127.0.0.0/8,
::1, localhost), for tests and a local relay.  Redirects are not followed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import random
import secrets
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import requests

from layerlock.license_server import events, logs
from layerlock.license_server.config import ServerConfig
from layerlock.license_server.keystore import KeyStore
from layerlock.license_server.redis_conn import REDIS_DOWN, RedisClient, connect
from layerlock.license_server.store import new_id, now_ms, outbox, seats
from layerlock.license_server.store import webhooks as store
from layerlock.license_server.store.audit import STREAM
from layerlock.license_server.store.commit import Commits
from layerlock.shared.errors import ConfigError, InvalidInput, LayerlockError

log = logging.getLogger("layerlock.webhooks")
SIGNATURE_HEADER = "Layerlock-Signature"
#: Deliveries sent at once (a slow endpoint holds one thread for up to ``webhook_timeout``).
SENDERS = 8
#: Outbox entries fanned out per pass.
FAN_OUT_BATCH = 200
#: Env var naming the gunicorn master that started this worker: it exits when the master is gone.
PARENT_ENV = "LAYERLOCK_BACKGROUND_PARENT"


def new_secret() -> str:
    """256 random bits; shown once at creation, then only ever held sealed under the KEK."""
    return "whsec_" + secrets.token_urlsafe(32)


def check_url(url: Any) -> str:
    """An https URL, or http to a loopback host, without credentials; else InvalidInput."""
    if not isinstance(url, str) or not 0 < len(url) <= 2000:
        raise InvalidInput("url must be a string of at most 2000 characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise InvalidInput("url does not parse") from None
    if parts.scheme not in ("https", "http") or not host:
        raise InvalidInput("url must be https://host/… (http:// only for a loopback host)")
    if parts.username is not None or parts.password is not None:  # it would be shown and audited
        raise InvalidInput("url must not carry a user or password: receivers authenticate a delivery by its "
                           "Layerlock-Signature")
    if parts.scheme == "http" and not _loopback(host):
        raise InvalidInput("plain http is allowed only for a loopback host (127.0.0.1, ::1, localhost); use https")
    return url


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def signature(secret: str, body: bytes, t: int) -> str:
    mac = hmac.new(secret.encode(), str(t).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, header: str, body: bytes, *, tolerance: int = 300, now: float | None = None) -> bool:
    """Receiver side: whether ``header`` (``Layerlock-Signature``) signs ``body`` with ``secret``."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    t, sig = parts.get("t", ""), parts.get("v1", "")
    if not t.isdigit() or abs((time.time() if now is None else now) - int(t)) > tolerance:
        return False
    mac = hmac.new(secret.encode(), t.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, sig)


def _event_docs(r: RedisClient, entry: str) -> list[dict[str, Any]]:
    """The events an outbox entry stands for (an audit record id, or an inline JSON event)."""
    if entry.startswith("{"):
        try:
            doc = json.loads(entry)
        except ValueError:
            return []
        return [doc] if isinstance(doc, dict) and doc.get("type") in events.TYPES else []
    found = r.xrange(STREAM, min=entry, max=entry, count=1)
    if not found:
        return []
    rec = json.loads(found[0][1].get("rec", "{}"))
    data = {k: v for k, v in rec.items() if k not in ("type", "ts", "prev")}
    return [{"id": events.event_id(entry, t), "type": t, "created": rec.get("ts"), "audit_id": entry,
             "record_type": rec.get("type"), "data": data} for t in events.of_record(rec)]


def queue_inline(r: RedisClient, type_: str, data: dict[str, Any], ident: str) -> None:
    """Queue an event that has no audit record of its own (``checkpoint.signed``), if anybody listens."""
    if not (r.scard(outbox.subscribers(type_)) or r.scard(outbox.subscribers(events.ALL))):
        return
    doc = {"id": f"evt_{ident}.{type_}", "type": type_, "created": round(time.time(), 3), "data": data}
    r.lpush(outbox.OUTBOX, json.dumps(doc, sort_keys=True, separators=(",", ":")))


class Worker:
    def __init__(self, config: ServerConfig, r: RedisClient, keys: KeyStore) -> None:
        self.config = config
        self.r = r
        self.keys = keys
        self.commits = Commits(r)
        self.deliveries = store.Deliveries(r)
        self.session = requests.Session()
        self.pool = ThreadPoolExecutor(SENDERS, thread_name_prefix="webhook")
        self._inflight: dict[str, Future[None]] = {}

    # --- one pass ------------------------------------------------------------------------------
    def tick(self) -> dict[str, int]:
        now = time.time()
        culled = seats.cull(self.commits, now)
        fanned = self.fan_out(now)
        sent = self.send_due(now)
        return {"culled": culled, "fanned_out": fanned, "sent": sent}

    def fan_out(self, now: float) -> int:
        done = 0
        for _ in range(FAN_OUT_BATCH):
            entry = self.deliveries.oldest_event()
            if entry is None:
                break
            deliveries = []
            for doc in _event_docs(self.r, entry):
                for hook in self._subscribers(doc["type"]):
                    body = json.dumps(doc, sort_keys=True, separators=(",", ":"))
                    deliveries.append({"delivery_id": new_id("dlv"), "webhook": hook, "event_id": doc["id"],
                                       "type": doc["type"], "record": doc.get("audit_id", ""), "body": body,
                                       "status": "pending", "attempts": "0", "created_at": str(now_ms()),
                                       "window_from": str(round(now, 3)), "next_at": str(round(now, 3))})
            if self.deliveries.fan_out(entry, deliveries, now):
                done += 1
        return done

    def _subscribers(self, type_: str) -> list[str]:
        ids: set[str] = self.r.sunion(outbox.subscribers(type_), outbox.subscribers(events.ALL))
        return sorted(ids)

    def send_due(self, now: float) -> int:
        for ident, fut in list(self._inflight.items()):
            if fut.done():
                del self._inflight[ident]
        room = SENDERS * 2 - len(self._inflight)
        started = 0
        for ident in self.deliveries.due(now, max(0, room)):
            if ident in self._inflight or not self.deliveries.claim(ident, now):
                continue
            self._inflight[ident] = self.pool.submit(self._attempt, ident)
            started += 1
        return started

    def wait_idle(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for fut in list(self._inflight.values()):
            fut.result(timeout=max(0.0, deadline - time.monotonic()))

    # --- one delivery --------------------------------------------------------------------------
    def _attempt(self, ident: str) -> None:
        try:
            self._send(ident)
        except REDIS_DOWN:
            log.warning("redis unreachable during a delivery", extra={"fields": {"event": "webhook_redis_down",
                                                                                 "delivery": ident}})
        except Exception:  # noqa: BLE001 - one bad delivery must not stop the others
            log.exception("delivery failed unexpectedly", extra={"fields": {"event": "webhook_error",
                                                                            "delivery": ident}})

    def _send(self, ident: str) -> None:
        try:
            rec = self.deliveries.get(ident)
        except LayerlockError:
            self.r.zrem(store.QUEUE, ident)
            return
        try:
            hook = store.get(self.r, rec["webhook"])
        except LayerlockError:
            hook = {}
        if hook.get("status") != "active":
            self.deliveries.finish(ident, "cancelled", {"last_error": "webhook disabled"})
            return
        secret = self.keys.open_data_key(hook["secret"], hook["kek_id"], store.secret_label(hook["webhook_id"]))
        body = rec["body"].encode()
        t = int(time.time())
        headers = {"Content-Type": "application/json", "User-Agent": "layerlock-webhooks/1",
                   "Layerlock-Event": rec["type"], "Layerlock-Event-Id": rec["event_id"],
                   "Layerlock-Delivery": ident, SIGNATURE_HEADER: signature(secret.decode(), body, t)}
        del secret
        attempts = int(rec.get("attempts", "0")) + 1
        status, error = 0, ""
        try:
            resp = self.session.post(hook["url"], data=body, headers=headers, timeout=self.config.webhook_timeout,
                                     allow_redirects=False)
            status = resp.status_code
            resp.close()
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except requests.RequestException as exc:
            error = type(exc).__name__
        now = time.time()
        fields = {"attempts": str(attempts), "last_attempt_at": str(round(now, 3)),
                  "last_status": str(status) if status else "", "last_error": error}
        if not error:
            self.deliveries.finish(ident, "delivered", {**fields, "delivered_at": str(round(now, 3))})
            log.info("webhook delivered", extra={"fields": {"event": "webhook_delivered", "delivery": ident,
                                                            "webhook": hook["webhook_id"], "type": rec["type"],
                                                            "attempts": attempts}})
            return
        window_from = float(rec.get("window_from") or int(rec.get("created_at", "0")) / 1000)
        if now - window_from >= self.config.webhook_retry_for:
            self.deliveries.finish(ident, "failed", fields)
            log.warning("webhook delivery failed for good", extra={"fields": {
                "event": "webhook_failed", "delivery": ident, "webhook": hook["webhook_id"], "error": error}})
            return
        delay = min(self.config.webhook_backoff_max, self.config.webhook_backoff * 2 ** (attempts - 1))
        self.deliveries.retry(ident, now + delay * random.uniform(0.8, 1.2), fields)
        log.info("webhook delivery failed; will retry", extra={"fields": {
            "event": "webhook_retry", "delivery": ident, "webhook": hook["webhook_id"], "error": error,
            "attempts": attempts}})

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=False)
        self.session.close()


def run(config: ServerConfig, stop: threading.Event) -> None:
    """Pass after pass until ``stop`` (or the master that started us is gone)."""
    r = connect(config.redis_url, config.redis_timeout)
    worker = Worker(config, r, KeyStore(config.key_dir, max_token_life=config.max_offline_grace))
    parent = int(os.environ.get(PARENT_ENV, "0") or 0)
    log.info("background worker started", extra={"fields": {"event": "background_started", "pid": os.getpid()}})
    try:
        while not stop.is_set():
            if parent and os.getppid() != parent:
                log.warning("the server that started this worker is gone; exiting",
                            extra={"fields": {"event": "background_orphaned"}})
                break
            try:
                worker.tick()
            except REDIS_DOWN:
                log.warning("redis unreachable; retrying", extra={"fields": {"event": "background_redis_down"}})
            except Exception:  # noqa: BLE001 - keep the worker alive; the next pass retries
                log.exception("background pass failed", extra={"fields": {"event": "background_error"}})
            stop.wait(config.background_interval)
    finally:
        worker.close()


def main() -> None:
    """``layerlock webhooks run`` / ``python -m layerlock.license_server.webhooks``: exits 0 on SIGTERM/SIGINT."""
    try:
        config = ServerConfig.load()
    except ConfigError as err:  # one line and exit 2, as the server's own master does
        print(f"layerlock webhooks run: configuration error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    logs.setup(config.log_level)
    if not config.redis_url:
        print("layerlock webhooks run: no Redis URL (set LAYERLOCK_REDIS_URL; `layerlock serve` starts the "
              "worker itself, with its embedded Redis)", file=sys.stderr)
        raise SystemExit(2)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run(config, stop)


if __name__ == "__main__":
    main()
