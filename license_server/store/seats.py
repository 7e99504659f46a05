"""Seats of pool licenses (``seats`` and ``floating``): who holds one, and until when.

``{ll}:seats:<license>`` is a zset machine → *until* (Unix seconds): a seat is **live** while
``until >= now``.  ``until`` is the lease's end plus the license's revive window for a lease
(``lease_ttl`` > 0: every floating license, and node-locked seats that ops gave a heartbeat), or
``+inf`` for a node-locked seat held until ops release it.  ``{ll}:leases`` indexes every finite
lease (member ``<license>|<machine>``, same score) for the culler.

Taking a seat is part of the activation's one commit (:func:`take`): a guard re-checks, inside
the Lua script that writes the seat, that the machine already holds a live seat or that fewer
than ``seats`` are live — so 50 machines racing for 10 seats get exactly 10 grants, and the
other 40 decide again on fresh data (``seats_exhausted``).  A renewal is a heartbeat: it moves
``until`` on.  A machine offline past its lease keeps its seat through the revive window (its
token has expired — a floating token never outlives its lease — but nobody else can take the
seat); after it, :func:`cull` releases the seat with a ``lease_culled`` audit record.
"""

from __future__ import annotations

import math
from typing import Any

from layerlock.license_server.redis_conn import RedisClient
from layerlock.license_server.store import P
from layerlock.license_server.store.commit import Change, Commits, GuardFailed
from layerlock.shared.errors import NotFound

LEASES = P + "leases"
#: Leases one :func:`cull` pass looks at.
CULL_BATCH = 200


def key(license_id: str) -> str:
    return f"{P}seats:{license_id}"


def lease_member(license_id: str, machine: str) -> str:
    return f"{license_id}|{machine}"


def lease_end(rec: dict[str, str], iat: int) -> int | None:
    """When a token issued at ``iat`` under a pool license must stop being used (None: no lease)."""
    ttl = int(rec.get("lease_ttl", 0) or 0)
    return iat + ttl if ttl > 0 else None


def until(rec: dict[str, str], iat: int) -> float:
    """The seat's score after a grant at ``iat``: lease end + revive window, or +inf (no lease)."""
    end = lease_end(rec, iat)
    return math.inf if end is None else float(end + int(rec.get("revive_ttl", 0) or 0))


def _score(value: float) -> str:
    return "+inf" if math.isinf(value) else str(int(value))


def take(change: Change, rec: dict[str, str], machine: str, now: float, iat: int) -> Change:
    """Guard (the machine holds a live seat, or one is free) and (re)take the seat, in ``change``."""
    license_id, k = rec["license_id"], key(rec["license_id"])
    score = until(rec, iat)
    change.guard("seat", k, machine, str(int(rec["seats"])), repr(float(now)))
    change.write("ZADD", k, _score(score), machine)
    if not math.isinf(score):
        change.write("ZADD", LEASES, _score(score), lease_member(license_id, machine))
    return change


def holders(r: RedisClient, license_id: str, now: float) -> list[dict[str, Any]]:
    """Every machine on the license's seats, live first: ``{machine, until (None: held until
    released), live}``; a lapsed one is still listed until the culler releases it."""
    out = []
    for machine, score in r.zrevrange(key(license_id), 0, -1, withscores=True):
        out.append({"machine": machine, "until": None if math.isinf(score) else int(score),
                    "live": score >= now})
    return out


def usage(r: RedisClient, rec: dict[str, str], now: float) -> dict[str, Any]:
    """``{seats, used, holders}`` of a pool license (what ``licenses show`` prints)."""
    held = holders(r, rec["license_id"], now)
    return {"seats": int(rec.get("seats", 0)), "used": sum(h["live"] for h in held), "holders": held}


def release(commits: Commits, license_id: str, machine: str, *, actor: str, reason: str = "") -> None:
    """Ops free a machine's seat, with its ``seat_released`` record, atomically (404 if it holds none).

    The machine takes a seat again at its next activation if one is free: to keep it out,
    deactivate the machine (or revoke the license)."""
    k = key(license_id)
    change = Change().guard("zmember", k, machine).write("ZREM", k, machine)
    change.write("ZREM", LEASES, lease_member(license_id, machine))
    try:
        commits.commit("seat_released", change, actor=actor, license=license_id, machine=machine, reason=reason)
    except GuardFailed:
        raise NotFound(f"machine {machine} holds no seat of license {license_id}") from None


def cull(commits: Commits, now: float, *, limit: int = CULL_BATCH) -> int:
    """Release every lease whose window (lease + revive) ended before ``now``, one audited
    ``lease_culled`` record each; a lease renewed meanwhile fails its guard and stays.  Returns
    how many were culled."""
    culled = 0
    for member, score in commits.r.zrangebyscore(LEASES, "-inf", f"({now}", start=0, num=limit, withscores=True):
        license_id, _, machine = member.partition("|")
        k = key(license_id)
        change = Change().guard("zscore_le", k, machine, repr(float(now))).write("ZREM", k, machine)
        change.write("ZREM", LEASES, member)
        try:
            commits.commit("lease_culled", change, actor="system", license=license_id, machine=machine,
                           lapsed_at=int(score))
            culled += 1
        except GuardFailed:  # renewed (its score moved on) or released meanwhile: nothing to cull
            commits.r.eval(_DROP_ORPHAN, 2, k, LEASES, machine, member, _score(score))
    return culled


# An index entry whose seat is gone (nothing else removes it) would fail its guard at every pass.
_DROP_ORPHAN = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == false and redis.call('ZSCORE', KEYS[2], ARGV[2]) == ARGV[3] then
  return redis.call('ZREM', KEYS[2], ARGV[2])
end
return 0
"""
