"""Webhook endpoints and their deliveries, in Redis.

=============================  ==========================================================
``{ll}:webhook:<id>``            hash: url, events (JSON), status, description, the signing
                               secret sealed under the KEK (``secret`` + ``kek_id``)
``{ll}:webhooks``                zset of webhook ids by creation time (listing)
``{ll}:wh:on:<event>``           set of active webhook ids subscribed to an event (``*``: all)
``{ll}:wh:outbox``               list: audit record ids (or inline JSON events) to fan out
``{ll}:wh:d:<delivery>``         hash: one event for one endpoint — body, status (pending,
                               delivered, failed, cancelled), attempts, next_at, last result
``{ll}:wh:queue``                zset delivery id → when it is due (Unix s); a claimed one is
                               pushed ``CLAIM_S`` ahead, so a worker that dies mid-send
                               leaves it due again (at-least-once)
``{ll}:wh:log``                  stream of delivery ids, newest last (the delivery log)
=============================  ==========================================================

The secret is needed to sign (HMAC), so it cannot be stored hashed: it is sealed under the
server's KEK like a model's data key (AES-256-GCM, bound to ``webhook:<id>``), shown once at
creation, never logged, and re-sealed by ``keys rotate-kek``.  Creating, disabling a webhook and
replaying a delivery are principals' acts, each committed with its audit record.
"""

from __future__ import annotations

import json
import time
from typing import Any

from layerlock.license_server.redis_conn import RedisClient
from layerlock.license_server.store import P, new_id, now_ms, outbox
from layerlock.license_server.store.commit import Change, Commits, GuardFailed, until_committed
from layerlock.shared.errors import Conflict, NotFound
from layerlock.shared.urls import shown

ALL = P + "webhooks"
QUEUE = P + "wh:queue"
LOG = P + "wh:log"
#: How far a claimed delivery's due time is pushed while it is being sent.
CLAIM_S = 60
#: Deliveries kept in the log stream (approximately); a finished delivery's hash lives this long.
LOG_MAX = 100_000
KEEP_S = 30 * 86_400


def key(webhook_id: str) -> str:
    return f"{P}webhook:{webhook_id}"


def delivery_key(delivery_id: str) -> str:
    return f"{P}wh:d:{delivery_id}"


def secret_label(webhook_id: str) -> str:
    """What a webhook secret is sealed to (model ids never contain ``:``, so no model key's label)."""
    return f"webhook:{webhook_id}"


def record(url: str, events: list[str], description: str, sealed: str, kek_id: str) -> dict[str, str]:
    return {"webhook_id": new_id("wh"), "url": url, "events": json.dumps(events), "description": description,
            "status": "active", "secret": sealed, "kek_id": kek_id, "created_at": str(now_ms())}


def _subscriptions(change: Change, rec: dict[str, str], command: str) -> Change:
    for event in json.loads(rec["events"]):
        change.write(command, outbox.subscribers(event), rec["webhook_id"])
    return change


def create(commits: Commits, rec: dict[str, str], *, actor: str) -> None:
    k = key(rec["webhook_id"])
    change = Change().guard("absent", k).hset(k, rec).write("ZADD", ALL, rec["created_at"], rec["webhook_id"])
    try:
        commits.commit("webhook_created", _subscriptions(change, rec, "SADD"), actor=actor,
                       webhook=rec["webhook_id"], url=shown(rec["url"]), events=json.loads(rec["events"]))
    except GuardFailed:
        raise Conflict("webhook id collision; retry") from None


def get(r: RedisClient, webhook_id: str) -> dict[str, str]:
    rec: dict[str, str] = r.hgetall(key(webhook_id))
    if not rec:
        raise NotFound(f"webhook {webhook_id} does not exist")
    return rec


def disable(commits: Commits, webhook_id: str, *, actor: str) -> dict[str, str]:
    """No new deliveries to it (its pending ones are cancelled when due), with its record."""
    k = key(webhook_id)

    def attempt() -> dict[str, str]:
        rec = get(commits.r, webhook_id)
        if rec.get("status") != "active":
            raise Conflict(f"webhook {webhook_id} is already disabled")
        change = Change().guard("eq", k, "status", "active").hset(k, {"status": "disabled"})
        commits.commit("webhook_disabled", _subscriptions(change, rec, "SREM"), actor=actor, webhook=webhook_id)
        return {**rec, "status": "disabled"}

    return until_committed(attempt, what=f"webhook {webhook_id}")


def rewrap(commits: Commits, keys: Any, webhook_id: str, *, kek_id: str, actor: str) -> None:
    """Re-seal the secret under the KEK ``kek_id`` (KEK rotation), with its record."""
    k = key(webhook_id)

    def attempt() -> None:
        old = get(commits.r, webhook_id)
        if old.get("kek_id") == kek_id:
            return
        secret = keys.open_data_key(old["secret"], old["kek_id"], secret_label(webhook_id))
        sealed, new_kek = keys.seal_data_key(secret, secret_label(webhook_id))
        change = Change().guard("eq", k, "secret", old["secret"]).hset(k, {"secret": sealed, "kek_id": new_kek})
        commits.commit("webhook_secret_rewrapped", change, actor=actor, webhook=webhook_id, kek_id=new_kek)

    until_committed(attempt, what=f"webhook {webhook_id}")


def public_view(rec: dict[str, str]) -> dict[str, Any]:
    """Never the secret, not even sealed; the URL without its query (a token some receivers take
    there), as the append-only audit record has it: readers and auditors see where, not how."""
    return {"webhook_id": rec["webhook_id"], "url": shown(rec["url"]), "events": json.loads(rec["events"]),
            "description": rec.get("description", ""), "status": rec.get("status", "active"),
            "created_at": int(rec["created_at"]) // 1000}


# --- deliveries ----------------------------------------------------------------------------------
# KEYS: outbox, queue, log.  ARGV: the entry expected at the outbox's tail, now, deliveries (JSON:
# [[hash key, delivery id, field, value, ...], ...]), log max length.  Pops the entry and creates
# its deliveries only if it is still the tail (another worker did not take it meanwhile).
_FAN_OUT = """
if redis.call('LINDEX', KEYS[1], -1) ~= ARGV[1] then return 0 end
redis.call('RPOP', KEYS[1])
for _, d in ipairs(cjson.decode(ARGV[3])) do
  local fields = {}
  for j = 3, #d do fields[#fields + 1] = d[j] end
  redis.call('HSET', d[1], unpack(fields))
  redis.call('ZADD', KEYS[2], ARGV[2], d[2])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'd', d[2])
end
return 1
"""
# KEYS: queue.  ARGV: delivery id, now, claimed until.  1 if it was due and is now ours.
_CLAIM = """
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) <= tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 1
end
return 0
"""


class Deliveries:
    """The delivery queue's Redis side (the HTTP side is :mod:`layerlock.license_server.webhooks`)."""

    def __init__(self, r: RedisClient) -> None:
        self.r = r
        self._fan_out = r.register_script(_FAN_OUT)
        self._claim = r.register_script(_CLAIM)

    def oldest_event(self) -> str | None:
        entry: str | None = self.r.lindex(outbox.OUTBOX, -1)
        return entry

    def fan_out(self, entry: str, deliveries: list[dict[str, str]], now: float) -> bool:
        """Pop ``entry`` and queue its ``deliveries`` (each a delivery hash), atomically."""
        flat = []
        for d in deliveries:
            fields: list[str] = []
            for f, v in d.items():
                fields += [f, str(v)]
            flat.append([delivery_key(d["delivery_id"]), d["delivery_id"], *fields])
        return bool(self._fan_out(keys=[outbox.OUTBOX, QUEUE, LOG],
                                  args=[entry, repr(now), json.dumps(flat), LOG_MAX]))

    def due(self, now: float, limit: int) -> list[str]:
        ids: list[str] = self.r.zrangebyscore(QUEUE, "-inf", repr(now), start=0, num=limit)
        return ids

    def claim(self, delivery_id: str, now: float) -> bool:
        return bool(self._claim(keys=[QUEUE], args=[delivery_id, repr(now), repr(now + CLAIM_S)]))

    def get(self, delivery_id: str) -> dict[str, str]:
        rec: dict[str, str] = self.r.hgetall(delivery_key(delivery_id))
        if not rec:
            raise NotFound(f"delivery {delivery_id} does not exist")
        return rec

    def finish(self, delivery_id: str, status: str, fields: dict[str, str]) -> None:
        """A final state (delivered, failed, cancelled): off the queue, kept ``KEEP_S``."""
        k = delivery_key(delivery_id)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(k, mapping={**fields, "status": status, "next_at": ""})
            pipe.zrem(QUEUE, delivery_id)
            pipe.expire(k, KEEP_S)
            pipe.execute()

    def retry(self, delivery_id: str, at: float, fields: dict[str, str]) -> None:
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(delivery_key(delivery_id), mapping={**fields, "next_at": str(round(at, 3))})
            pipe.zadd(QUEUE, {delivery_id: at})
            pipe.execute()

    def page(self, *, cursor: str | None, limit: int,
             keep: Any) -> tuple[list[dict[str, str]], str | None]:
        """Newest first, from the log stream; ``cursor``: the log entry id to continue below."""
        hi = f"({cursor}" if cursor else "+"
        out: list[dict[str, str]] = []
        for _ in range(20):
            batch = self.r.xrevrange(LOG, max=hi, min="-", count=max(limit, 200))
            if not batch:
                return out, None
            with self.r.pipeline(transaction=False) as pipe:
                for _, entry in batch:
                    pipe.hgetall(delivery_key(entry.get("d", "")))
                recs = pipe.execute()
            for (sid, _), rec in zip(batch, recs, strict=True):
                if rec and keep(rec):
                    out.append(rec)
                    if len(out) == limit:
                        return out, sid
            hi = f"({batch[-1][0]}"
        return out, hi[1:]


def replay(commits: Commits, delivery_id: str, *, actor: str) -> dict[str, str]:
    """Queue a delivery again now, with a fresh retry window (same event id: receivers dedupe)."""
    k = delivery_key(delivery_id)

    def attempt() -> dict[str, str]:
        rec = Deliveries(commits.r).get(delivery_id)
        now = time.time()
        fields = {"status": "pending", "next_at": str(round(now, 3)), "window_from": str(round(now, 3))}
        change = Change().guard("eq", k, "status", rec.get("status", "")).guard("eq", k, "attempts",
                                                                                rec.get("attempts", "0"))
        change.hset(k, fields).write("HINCRBY", k, "replays", 1).write("PERSIST", k)
        change.write("ZADD", QUEUE, repr(now), delivery_id)
        commits.commit("webhook_replayed", change, actor=actor, delivery=delivery_id, webhook=rec.get("webhook"),
                       event=rec.get("event_id"))
        return {**rec, **fields, "replays": str(int(rec.get("replays", "0")) + 1)}

    return until_committed(attempt, what=f"delivery {delivery_id}")


def delivery_view(rec: dict[str, str]) -> dict[str, Any]:
    def num(name: str) -> float | None:
        return float(rec[name]) if rec.get(name) else None

    return {"delivery_id": rec["delivery_id"], "webhook_id": rec.get("webhook", ""),
            "event_id": rec.get("event_id", ""), "type": rec.get("type", ""), "status": rec.get("status", ""),
            "attempts": int(rec.get("attempts", "0")),
            "replays": int(rec.get("replays", "0")), "created_at": int(rec.get("created_at", "0")) // 1000,
            "next_at": num("next_at"), "last_attempt_at": num("last_attempt_at"),
            "last_status": int(rec["last_status"]) if rec.get("last_status") else None,
            "last_error": rec.get("last_error", ""), "delivered_at": num("delivered_at")}
