"""State in Redis, one small module per concern.  Key layout (prefix ``{ll}:``):

==================================  ==============================================================
``{ll}:machine:<code>``             hash: customer, labels (JSON), status, public keys, device
``{ll}:machines``                   zset of codes by registration time (ms): listing cursor
``{ll}:model:<id>``                 hash: name, version, family, released_at, status, KEK-sealed
                                    data key + kek_id
``{ll}:models``                     zset of model ids by time
``{ll}:license:<id>``               hash: machine, model, customer, validity window, status; kind,
                                    seats, lease_ttl, revive_ttl, family + versions rule, airgap_ttl
``{ll}:licenses``                   zset of license ids by issue time
``{ll}:lic:<machine>:<model>``      set of the machine's license ids for a model (activation lookup)
``{ll}:lic:<machine>:@<family>``    ... for a model family (model ids never start with ``@``)
``{ll}:clic:<customer>:<model>``    set of the customer's pool (seats/floating) license ids for a model
``{ll}:clic:<customer>:@<fam>``     ... for a model family.  The activation's one read
                                    (``guards.py``) takes the customer from the machine hash and the
                                    family from the model hash and reads all four sets in one script
``{ll}:seats:<license>``            zset machine → seat held until (Unix s; +inf: until released)
``{ll}:leases``                     zset ``<license>|<machine>`` → lease end + revive: what the
                                    culler scans (``seats.py``)
``{ll}:webhook:<id>``,              webhook endpoints (secret KEK-sealed) and their listing
``{ll}:webhooks``
``{ll}:wh:on:<event>``              set of webhook ids subscribed to an event (``*``: all)
``{ll}:wh:outbox``                  list of audit record ids to fan out (pushed by the commit script)
``{ll}:wh:d:<id>``, ``:wh:queue``,  deliveries, their due times, their log (``webhooks.py``)
``{ll}:wh:log``
``{ll}:apikey:<id>``,               API keys (hash only) and lookup
``{ll}:apikey-hash:<sha256>``
``{ll}:claim:<sha256>``             hash: an enrollment claim (only the secret's hash is stored)
``{ll}:nonce:<machine>:<nonce>``    SET NX EX: replay guard (air-gapped requests: ``offline_request_ttl``)
``{ll}:done:<random>``              the record id of one commit, 60 s: a resent commit is applied once
``{ll}:rl:m:<machine>:<min>``       signed activation requests of a machine this minute
``{ll}:rl:bad:<source>:<min>``      failed unauthenticated requests of a source this minute
``{ll}:rejects:<YYYYMMDDHH>``       hash reason → count: unauthenticated rejections, per hour
``{ll}:audit``, ``{ll}:audit:head`` hash-chained audit stream and the hash of its last record
``{ll}:audit:checkpoints``          list, newest first: the last signed checkpoints (``checkpoints.py``)
``{ll}:console:session:<sha256>``   console sessions (``console/sessions.py``)
==================================  ==============================================================

**Why every key carries the same hash tag** ``{ll}``: on a Redis Cluster a script or a MULTI may
only touch keys of one hash slot, and here every state change commits atomically with its audit
record (``commit.py``) and moves the one chain head, while the activation's read (``guards.py``)
spans the machine, the model, the license indexes and the rate counters.  So the whole ledger is
one slot: a cluster gives client-side routing and per-shard failover, not write scaling (the
ledger lives on one primary).  Splitting it would mean one audit chain per shard and checkpoints
over all heads — not built.  On a single Redis or a Sentinel group the tag is just part of the
name.  :mod:`~layerlock.license_server.store.layout` moves a database written with the old
``ll:`` prefix (before 2026-11-27) once, at startup.

The layout is public on purpose: ``bench/activate.py`` bulk-loads 100,000 machines with it.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

P = "{ll}:"
#: Batches one listing call reads at most: a filter that matches rarely returns a short page and
#: a cursor instead of scanning everything at once.
MAX_PAGE_BATCHES = 20


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
    records and the next cursor (None at the end); at most :data:`MAX_PAGE_BATCHES` batches.
    """
    out: list[dict[str, str]] = []
    batch = max(limit, 100)
    pos = cursor
    for _ in range(MAX_PAGE_BATCHES):
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
