"""Replay and abuse guards for activation: nonces (SET NX EX) and fixed-window rate limits."""

from __future__ import annotations

import time

from license_server.redis_conn import Client
from license_server.store import P


def nonce_fresh(r: Client, machine: str, nonce: str, ttl: int) -> bool:
    """True the first time a (machine, nonce) is seen within ``ttl`` seconds."""
    return bool(r.set(f"{P}nonce:{machine}:{nonce}", "1", nx=True, ex=ttl))


def within_limits(r: Client, checks: list[tuple[str, str, int]]) -> str | None:
    """Count one hit for each (kind, who, per_minute); return the first kind over its limit."""
    window = int(time.time() // 60)
    with r.pipeline(transaction=False) as pipe:
        for kind, who, _ in checks:
            k = f"{P}rl:{kind}:{who}:{window}"
            pipe.incr(k)
            pipe.expire(k, 120)
        counts = pipe.execute()[0::2]
    for (kind, _, limit), count in zip(checks, counts, strict=True):
        if count > limit:
            return kind
    return None
