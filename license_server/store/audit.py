"""The audit trail: a Redis stream of hash-chained records, written atomically with the state.

Each record's canonical JSON carries ``prev``, the SHA-256 of the previous record's canonical
JSON (``"0"*64`` for the first), so deleting, reordering or editing any record breaks the chain
from that point on — unless the writer re-chains every later record, which only a signed
checkpoint held outside Redis catches (:mod:`layerlock.license_server.checkpoints`).

Redis's Lua has no SHA-256, so the append is a compare-and-set: Python reads the head hash,
builds and hashes the record, and one Lua script (:data:`_COMMIT`) moves the head *only if the
head is still the one the record points at* — retried on a race, the script handing the loser
the current head so the retry costs no extra read.

The same script carries the state change the record describes (a :class:`Change`: guards,
writes, optionally a nonce to burn), so a registration, issuance, revocation, extension or
activation and its audit record are one atomic unit: both happen or neither does, whatever
crashes when.  Guards are re-checked inside the script, so a change computed from a read is
applied only if what it was computed from is still there (optimistic concurrency without
WATCH).  Records name machines, models, licenses and key ids, never keys, tokens, ``wk`` or
API keys.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from layerlock.license_server.checkpoints import ChainBroken, ChainWalk, Checkpoint
from layerlock.license_server.redis_conn import Client
from layerlock.license_server.store import P, dumps
from layerlock.shared.errors import Conflict, LayerlockError, NotFound

STREAM = P + "audit"
HEAD = P + "audit:head"
GENESIS = "0" * 64
SECRET_FIELDS = frozenset({"token", "wk", "api_key", "key", "sealed_key", "data_key", "sig"})

# KEYS: stream, head, then the state keys the program names by index (3, 4, ...).
# ARGV: genesis, expected head, record, its hash, program (JSON).
# Program: {"g": guards, "w": writes, "n": [nonce key index, ttl]} (each part optional).
#   guard [op, key, field, value]: "absent"/"present" (the key), "eq" (HGET == value),
#   "nofield" (HEXISTS == 0), "hlen" (HLEN == value); the first failing one returns {-1, index}
#   and nothing is written.
#   "n": SET key 1 NX EX ttl; if the nonce was already there, nothing is written ({2, 0}).
#   write [command, key, args...]: redis.call(command, KEYS[key], args...).
# Returns {1, id} when committed, or {0, current head} so a loser retries without a round trip.
_COMMIT = """
local head = redis.call('GET', KEYS[2]) or ARGV[1]
if head ~= ARGV[2] then return {0, head} end
local prog = cjson.decode(ARGV[5])
for i, g in ipairs(prog.g or {}) do
  local op, k = g[1], KEYS[g[2]]
  local ok
  if op == 'absent' then ok = redis.call('EXISTS', k) == 0
  elseif op == 'present' then ok = redis.call('EXISTS', k) == 1
  elseif op == 'eq' then ok = redis.call('HGET', k, g[3]) == g[4]
  elseif op == 'nofield' then ok = redis.call('HEXISTS', k, g[3]) == 0
  elseif op == 'hlen' then ok = redis.call('HLEN', k) == tonumber(g[4])
  else return redis.error_reply('unknown guard ' .. tostring(op)) end
  if not ok then return {-1, i} end
end
local n = prog.n
if n and not redis.call('SET', KEYS[n[1]], '1', 'NX', 'EX', n[2]) then return {2, 0} end
for _, w in ipairs(prog.w or {}) do
  local args = {}
  for j = 3, #w do args[#args + 1] = w[j] end
  redis.call(w[1], KEYS[w[2]], unpack(args))
end
local id = redis.call('XADD', KEYS[1], '*', 'rec', ARGV[3], 'h', ARGV[4])
redis.call('SET', KEYS[2], ARGV[4])
return {1, id}
"""


def digest(canonical: str) -> str:
    return hashlib.sha256(canonical.encode()).hexdigest()


class SecretInRecord(LayerlockError):
    """A caller tried to audit a secret-looking field: a bug, refused before anything is written."""

    code = "internal"


class GuardFailed(Exception):
    """A :class:`Change` guard did not hold at commit time; ``index`` says which (0-based)."""

    def __init__(self, index: int) -> None:
        super().__init__(f"guard {index} failed")
        self.index = index


class Replayed(Exception):
    """The change's nonce had been seen: nothing was written (the caller audits the replay)."""


class Change:
    """State writes committed atomically with one audit record, under guards (see :data:`_COMMIT`)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self._index: dict[str, int] = {}
        self.guards: list[list[Any]] = []
        self.writes: list[list[Any]] = []
        self.nonce: list[Any] | None = None

    def _k(self, key: str) -> int:
        if key not in self._index:
            self.keys.append(key)
            self._index[key] = len(self.keys) + 2  # after the stream and the head
        return self._index[key]

    def guard(self, op: str, key: str, field: str = "", value: str = "") -> Change:
        self.guards.append([op, self._k(key), field, value])
        return self

    def same_hash(self, key: str, snapshot: dict[str, str]) -> Change:
        """Guard: the hash still is exactly ``snapshot`` (same fields, same values)."""
        self.guard("hlen", key, "", str(len(snapshot)))
        for f, v in snapshot.items():
            self.guard("eq", key, f, v)
        return self

    def write(self, command: str, key: str, *args: Any) -> Change:
        self.writes.append([command, self._k(key), *(str(a) for a in args)])
        return self

    def hset(self, key: str, mapping: dict[str, str]) -> Change:
        flat: list[str] = []
        for f, v in mapping.items():
            flat += [f, str(v)]
        return self.write("HSET", key, *flat)

    def once(self, nonce_key: str, ttl: int) -> Change:
        """Burn a nonce (SET NX EX) in the same commit; if it was already burnt, nothing is written."""
        self.nonce = [self._k(nonce_key), int(ttl)]
        return self

    def program(self) -> str:
        prog: dict[str, Any] = {}
        if self.guards:
            prog["g"] = self.guards
        if self.writes:
            prog["w"] = self.writes
        if self.nonce:
            prog["n"] = self.nonce
        return json.dumps(prog, separators=(",", ":")) if prog else "{}"


class AuditLog:
    def __init__(self, r: Client) -> None:
        self.r = r
        self._commit = r.register_script(_COMMIT)

    def append(self, type_: str, *, actor: str = "", head: str | None = None, **fields: Any) -> str:
        """Append one record (no state change); returns its stream id.  Secret-looking fields are refused."""
        return self.commit(type_, None, actor=actor, head=head, **fields)

    def commit(self, type_: str, change: Change | None, *, actor: str = "", head: str | None = None,
               **fields: Any) -> str:
        """Apply ``change`` and append its record in one atomic step; returns the record's stream id.

        ``head``: the chain head if the caller already read it (saves a round trip; a stale one
        only costs a retry).  A guard that does not hold raises :class:`GuardFailed`, a nonce
        already burnt :class:`Replayed`; either way nothing is written.
        """
        body = self._body(type_, actor, fields)
        change = change or Change()
        keys = [STREAM, HEAD, *change.keys]
        program = change.program()
        prev = head or self.r.get(HEAD) or GENESIS
        for _ in range(100):
            canonical = dumps({**body, "prev": prev})
            status, value = self._commit(keys=keys, args=[GENESIS, prev, canonical, digest(canonical), program])
            if status == 1:
                return str(value)
            if status == 2:
                raise Replayed()
            if status == -1:
                raise GuardFailed(int(value) - 1)
            prev = value
        raise Conflict("audit log is too contended; retry")

    def update_hash(self, k: str, change: Callable[[dict[str, str]], dict[str, str]],
                    event: Callable[[dict[str, str], dict[str, str]], tuple[str, dict[str, Any]]], *,
                    guard: Callable[[Change, dict[str, str]], Change], actor: str, missing: str,
                    what: str) -> tuple[dict[str, str], dict[str, str]]:
        """Read the hash ``k`` and the chain head, write ``change(before)`` with the record
        ``event(before, after) -> (type, fields)`` under ``guard(Change(), before)``; when the
        guard fails (someone changed the hash meanwhile) read and compute again.

        Optimistic concurrency for every read-modify-write of one hash: the outcome is always
        one of the serial orders.  Returns (before, after).
        """
        for _ in range(50):
            with self.r.pipeline(transaction=False) as pipe:
                pipe.hgetall(k)
                pipe.get(HEAD)
                before, head = pipe.execute()
            if not before:
                raise NotFound(missing)
            fields = change(before)
            after = {**before, **fields}
            type_, doc = event(before, after)
            try:
                self.commit(type_, guard(Change(), before).hset(k, fields), actor=actor, head=head, **doc)
            except GuardFailed:
                continue
            return before, after
        raise Conflict(f"{what} is being changed by too many clients at once; retry")

    @staticmethod
    def _body(type_: str, actor: str, fields: dict[str, Any]) -> dict[str, Any]:
        leaked = SECRET_FIELDS & set(fields)
        if leaked:
            raise SecretInRecord(f"audit records never carry secrets ({', '.join(sorted(leaked))})")
        return {"type": type_, "ts": round(time.time(), 3), "actor": actor,
                **{k: v for k, v in fields.items() if v is not None}}

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
