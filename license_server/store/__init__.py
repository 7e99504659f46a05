"""State in Redis, one small module per concern.  Key layout (prefix ``ll:``):

=============================  ==========================================================
``ll:machine:<code>``          hash: customer, labels (JSON), status, public keys, device
``ll:machines``                zset of codes by registration time (ms): listing cursor
``ll:model:<id>``              hash: name, version, status, KEK-sealed data key + kek_id
``ll:models``                  zset of model ids by time
``ll:license:<id>``            hash: machine, model, customer, validity window, status
``ll:licenses``                zset of license ids by issue time
``ll:lic:<machine>:<model>``   set of license ids for the activation lookup
``ll:apikey:<id>`` / ``ll:apikey-hash:<sha256>``   API keys (hash only) and lookup
``ll:claim:<sha256>``         hash: an enrollment claim (only the secret's hash is stored)
``ll:nonce:<machine>:<nonce>`` SET NX EX: replay guard
``ll:rl:m:<machine>:<min>``    signed activation requests of a machine this minute
``ll:rl:bad:<source>:<min>``   failed unauthenticated requests of a source this minute
``ll:rejects:<YYYYMMDDHH>``    hash reason → count: unauthenticated rejections, per hour
``ll:audit`` / ``ll:audit:head``   hash-chained audit stream and the hash of its last record
``ll:audit:checkpoints``       list, newest first: the last signed checkpoints (``checkpoints.py``)
=============================  ==========================================================

The layout is public on purpose: ``bench/activate.py`` bulk-loads 100,000 machines with it.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

P = "ll:"


def now_ms() -> int:
    return int(time.time() * 1000)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def dumps(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def page(r: Any, index: str, hash_key: Any, cursor: int, limit: int,
         keep: Any) -> tuple[list[dict[str, str]], int | None]:
    """Walk an index zset from rank ``cursor``, keep records passing ``keep``, stop at ``limit``.

    Cursors are ranks in an insertion-ordered zset from which nothing is ever removed (retired,
    revoked and deactivated records stay), so a cursor stays valid between calls.  Returns the
    records and the next cursor (None at the end).  At most 20 batches per call: a filter that
    matches rarely returns a short page plus a cursor instead of scanning everything at once.
    """
    out: list[dict[str, str]] = []
    batch = max(limit, 100)
    pos = cursor
    for _ in range(20):
        ids = r.zrange(index, pos, pos + batch - 1)
        if not ids:
            return out, None
        with r.pipeline(transaction=False) as pipe:
            for ident in ids:
                pipe.hgetall(hash_key(ident))
            recs = pipe.execute()
        for i, rec in enumerate(recs):
            if rec and keep(rec):
                out.append(rec)
                if len(out) == limit:
                    nxt = pos + i + 1
                    return out, nxt if nxt < r.zcard(index) else None
        pos += len(ids)
    return out, pos
