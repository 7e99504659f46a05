"""The audit trail: a Redis stream of hash-chained records.

Each record's canonical JSON carries ``prev``, the SHA-256 of the previous record's canonical
JSON (``"0"*64`` for the first), so deleting, reordering or editing any record breaks the chain
from that point on.  Redis's Lua has no SHA-256, so the append is a compare-and-set: Python
reads the head hash, builds and hashes the record, and a Lua script appends it (XADD) and moves
the head *only if the head is still the one the record points at* — atomic, retried on a race.
Records name machines, models, licenses and key ids, never keys, tokens, ``wk`` or API keys.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from license_server.redis_conn import Client
from license_server.store import P, dumps
from shared.errors import Conflict

STREAM = P + "audit"
HEAD = P + "audit:head"
GENESIS = "0" * 64
SECRET_FIELDS = frozenset({"token", "wk", "api_key", "key", "sealed_key", "data_key", "sig"})

# Returns {1, stream id} on success, or {0, current head} so a loser retries without a round trip.
_APPEND = """
local head = redis.call('GET', KEYS[2]) or ARGV[1]
if head ~= ARGV[2] then return {0, head} end
local id = redis.call('XADD', KEYS[1], '*', 'rec', ARGV[3], 'h', ARGV[4])
redis.call('SET', KEYS[2], ARGV[4])
return {1, id}
"""


def digest(canonical: str) -> str:
    return hashlib.sha256(canonical.encode()).hexdigest()


class AuditLog:
    def __init__(self, r: Client) -> None:
        self.r = r
        self._append = r.register_script(_APPEND)

    def append(self, type_: str, *, actor: str = "", **fields: Any) -> str:
        """Append one record; returns its stream id.  Secret-looking fields are refused."""
        leaked = SECRET_FIELDS & set(fields)
        if leaked:
            raise ValueError(f"audit records never carry secrets ({', '.join(sorted(leaked))})")
        body = {"type": type_, "ts": round(time.time(), 3), "actor": actor,
                **{k: v for k, v in fields.items() if v is not None}}
        prev = self.r.get(HEAD) or GENESIS
        for _ in range(100):
            canonical = dumps({**body, "prev": prev})
            ok, value = self._append(keys=[STREAM, HEAD], args=[GENESIS, prev, canonical, digest(canonical)])
            if ok:
                return str(value)
            prev = value
        raise Conflict("audit log is too contended; retry")

    def list(self, *, cursor: str | None, limit: int, filters: dict[str, str],
             since: float | None, until: float | None) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first.  ``cursor`` is the stream id to continue below (exclusive)."""
        hi = f"({cursor}" if cursor else (f"{int(until * 1000)}-18446744073709551615" if until else "+")
        lo = f"{int(since * 1000)}-0" if since else "-"
        out: list[dict[str, Any]] = []
        for _ in range(50):
            batch = self.r.xrevrange(STREAM, max=hi, min=lo, count=max(limit, 200))
            if not batch:
                return out, None
            for sid, entry in batch:
                rec = json.loads(entry["rec"])
                if all(str(rec.get(k)) == v for k, v in filters.items()):
                    out.append({"id": sid, **rec})
                    if len(out) == limit:
                        return out, sid
            hi = f"({batch[-1][0]}"
        return out, hi[1:]

    def verify(self) -> dict[str, Any]:
        """Walk the whole chain oldest first; report the first break (or ok)."""
        prev = GENESIS
        count = 0
        start = "-"
        while True:
            batch = self.r.xrange(STREAM, min=start, max="+", count=1000)
            for sid, entry in batch:
                canonical = entry.get("rec", "")
                try:
                    rec = json.loads(canonical)
                except ValueError:
                    return {"ok": False, "checked": count, "break_at": sid, "reason": "record is not JSON"}
                if rec.get("prev") != prev:
                    return {"ok": False, "checked": count, "break_at": sid,
                            "reason": "prev does not match the hash of the previous record"}
                if dumps(rec) != canonical or entry.get("h") != digest(canonical):
                    return {"ok": False, "checked": count, "break_at": sid, "reason": "record was altered"}
                prev = digest(canonical)
                count += 1
            if len(batch) < 1000:
                break
            start = f"({batch[-1][0]}"
        head = self.r.get(HEAD) or GENESIS
        if head != prev:
            return {"ok": False, "checked": count, "break_at": "head",
                    "reason": "head hash does not match the last record (records removed at the end?)"}
        return {"ok": True, "checked": count, "head": head}
