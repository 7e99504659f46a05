"""Requests nobody answers for: counted, never audited one by one.

The audit trail records what a *principal* did: an API key holder, or a machine that proved it
holds its key.  A request that proves nothing (unknown machine, bad signature, a replayed or
stale capture, an unknown claim secret) could come from anyone, as fast as they can send it;
auditing each one would let an outsider grow the trail without bound and bury real events.
Such rejections are instead:

* counted per source (``{ll}:rl:bad:<source>:<minute>``) so a source that keeps failing is
  refused cheaply before any signature work — and *never* counted against the machine it
  names, so nobody can lock a machine out without its key;
* aggregated per hour and reason (``{ll}:rejects:<YYYYMMDDHH>``: one hash, one field per reason,
  kept 8 days), a bounded form ops can read at ``GET /v1/audit/rejections``;
* exported as the Prometheus counter ``layerlock_rejected_total{reason}``.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from typing import Any

from layerlock.license_server import metrics
from layerlock.license_server.redis_conn import RedisClient
from layerlock.license_server.store import P

KEEP_HOURS = 8 * 24


@functools.lru_cache(maxsize=4096)
def source(ip: str) -> str:
    """The unit a failure budget is kept for: the IPv4 address, or the IPv6 /64 (one host
    usually owns a whole /64, so per-address budgets would be free to dodge)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return "unknown"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{addr}/64", strict=False).network_address) + "/64"
    return str(addr)


def failure_key(ip: str, now: float | None = None) -> str:
    return f"{P}rl:bad:{source(ip)}:{int((now or time.time()) // 60)}"


def hour_key(now: float | None = None) -> str:
    return f"{P}rejects:{time.strftime('%Y%m%d%H', time.gmtime(now or time.time()))}"


def record(r: RedisClient, ip: str, reason: str) -> None:
    """Count one unauthenticated rejection: one pipelined round trip, fixed-size keys."""
    fk, hk = failure_key(ip), hour_key()
    with r.pipeline(transaction=False) as pipe:
        pipe.incr(fk)
        pipe.expire(fk, 120)
        pipe.hincrby(hk, reason, 1)
        pipe.expire(hk, KEEP_HOURS * 3600)
        pipe.execute()
    metrics.REJECTED.labels(reason=reason).inc()


def count_only(reason: str) -> None:
    """A rejection that must not even cost a Redis write (the source is over its budget)."""
    metrics.REJECTED.labels(reason=reason).inc()


def summary(r: RedisClient, hours: int, now: float | None = None) -> dict[str, Any]:
    """Per-hour counts by reason for the last ``hours`` hours, newest first, and the totals."""
    t = now or time.time()
    stamps = [t - 3600 * i for i in range(hours)]
    with r.pipeline(transaction=False) as pipe:
        for s in stamps:
            pipe.hgetall(hour_key(s))
        rows = pipe.execute()
    totals: dict[str, int] = {}
    out = []
    for s, row in zip(stamps, rows, strict=True):
        counts = {k: int(v) for k, v in sorted(row.items())}
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
        out.append({"hour": time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(s)), "counts": counts})
    return {"hours": out, "totals": dict(sorted(totals.items()))}
