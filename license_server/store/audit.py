"""The audit trail: a Redis stream of hash-chained records — how it is read and checked.

Each record's canonical JSON carries ``prev``, the SHA-256 of the previous record's canonical
JSON (``"0"*64`` for the first), so deleting, reordering or editing any record breaks the chain
from that point on — unless the writer re-chains every later record, which only a signed
checkpoint held outside Redis catches (:mod:`layerlock.license_server.checkpoints`).  Records
are appended only together with the state change they describe, by
:mod:`layerlock.license_server.store.commit`.  Records name machines, models, licenses and key
ids, never keys, tokens, ``wk`` or API keys.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from layerlock.license_server.checkpoints import ChainBroken, ChainWalk, Checkpoint
from layerlock.license_server.redis_conn import RedisClient
from layerlock.license_server.store import MAX_PAGE_BATCHES, P

STREAM = P + "audit"
HEAD = P + "audit:head"
GENESIS = "0" * 64


def digest(canonical: str) -> str:
    return hashlib.sha256(canonical.encode()).hexdigest()


class AuditLog:
    """Reading the trail: filtered listing, the raw export, and the chain check.  Writing is
    :class:`layerlock.license_server.store.commit.Commits`' job."""

    def __init__(self, r: RedisClient) -> None:
        self.r = r

    def records(self, *, cursor: str | None, limit: int, filters: dict[str, str],
             since: float | None, until: float | None) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first.  ``cursor`` is the stream id to continue below (exclusive)."""
        hi = f"({cursor}" if cursor else (f"{int(until * 1000)}-18446744073709551615" if until else "+")
        lo = f"{int(since * 1000)}-0" if since else "-"
        out: list[dict[str, Any]] = []
        for _ in range(MAX_PAGE_BATCHES):
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

    def raw(self, *, cursor: str | None, limit: int) -> tuple[list[dict[str, str]], str | None]:
        """Oldest first, each record exactly as stored (``rec`` string, ``h``), for verifying
        elsewhere; ``cursor`` is the stream id to continue after (exclusive)."""
        batch = self.r.xrange(STREAM, min=f"({cursor}" if cursor else "-", max="+", count=limit)
        items = [{"id": sid, "rec": entry.get("rec", ""), "h": entry.get("h", "")} for sid, entry in batch]
        return items, (batch[-1][0] if len(batch) == limit else None)

    def verify(self, anchors: Iterable[Checkpoint] = ()) -> dict[str, Any]:
        """Walk the whole chain oldest first; report the first break (or ok).

        ``anchors``: verified signed checkpoints; record #size must still hash to their head
        (:class:`~layerlock.license_server.checkpoints.ChainWalk`, also what the CLI runs locally).
        """
        start = "-"
        try:
            walk = ChainWalk(anchors)
            while True:
                batch = self.r.xrange(STREAM, min=start, max="+", count=1000)
                for sid, entry in batch:
                    walk.feed(sid, entry.get("rec", ""), entry.get("h", ""))
                if len(batch) < 1000:
                    break
                start = f"({batch[-1][0]}"
            head = self.r.get(HEAD) or GENESIS
            if head != walk.prev:
                return {"ok": False, "checked": walk.count, "break_at": "head",
                        "reason": "head hash does not match the last record (records removed at the end?)"}
            walk.finish()
        except ChainBroken as exc:
            return exc.report
        return {"ok": True, "checked": walk.count, "head": head}
