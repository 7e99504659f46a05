"""The write path for all state: read, decide, commit — atomically with one audit record.

Every state change (a registration, issuance, revocation, extension, claim, activation) is a
:class:`Change` — guards, writes, optionally a nonce to burn — committed by one Lua script
(:data:`_COMMIT`) together with the audit record that describes it, so both happen or neither
does, whatever crashes when.  When the record stands for a webhook event somebody subscribed
to, the same script queues its id for delivery (:mod:`~layerlock.license_server.store.outbox`):
an event exists if and only if its record does, and nothing is sent while a request waits.

Two kinds of retry, each with a named limit:

* **The chain head moved** (another worker appended between our read of the head and our
  commit): Redis's Lua has no SHA-256, so the record is hashed in Python and the script moves
  the head only if it is still the one the record points at; the loser gets the current head
  back and simply re-hashes (:data:`MAX_HEAD_RACES`).  The decision stands.  Each race costs a
  round trip, so a process commits one record at a time, each hashed against the head the
  previous one left (:meth:`Commits._guess`): under load that cut re-hashes from 1.7-2.4 to
  0.6-0.7 per activation (``layerlock_audit_head_races_total`` counts them).
* **What the decision was based on changed** (a guard failed): the caller reads and decides
  again (:func:`until_committed`, :data:`MAX_DECISIONS`) — optimistic concurrency without WATCH,
  so every outcome is one of the serial orders.

Running out of either is a :class:`~layerlock.shared.errors.Conflict` the caller may retry.

**Replication** (``redis_wait_replicas`` > 0, a Sentinel-managed primary with replicas, or the
cluster primary that serves the ledger's ``{ll}`` slot): Redis replicates asynchronously, so a
change the primary applied can die with it in a failover. A commit is therefore sent together with
``WAIT n timeout`` on the same connection (one pipelined round trip) and acknowledged only when
``n`` replicas hold it; otherwise it raises :class:`~layerlock.shared.errors.NotReplicated` (503
``not_replicated`` + ``Retry-After``), which means *applied on the primary, not confirmed* — never
"not done" (see the error's docstring).
Every state change goes through :meth:`Commits.commit`, so licenses, machines, claims, keys,
models, webhooks, nonces, seats and the audit chain all get it, and the webhook outbox with them
(the script queues the event).  Writes outside the commit are left unconfirmed on purpose:
rate-limit and rejection counters (:mod:`~layerlock.license_server.store.rejections`: a lost
minute of counts only refreshes a budget), console sessions (a lost one asks for a new login),
the background worker's delivery bookkeeping (at-least-once already: a lost step re-sends) and
its ``lease_culled`` records (nobody was told; the next pass culls again).  A signed audit
checkpoint covers records other requests wrote, possibly not yet replicated; it is confirmed with
:meth:`Commits.confirm` before it leaves the server, so an auditor never holds a checkpoint of
records a failover then lost (it would look like tampering).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from layerlock.license_server import metrics
from layerlock.license_server.redis_conn import RedisClient, is_cluster
from layerlock.license_server.store import P, dumps, outbox
from layerlock.license_server.store.audit import GENESIS, HEAD, STREAM, digest
from layerlock.shared.errors import Conflict, LayerlockError, NotFound, NotReplicated

T = TypeVar("T")
#: Re-hashes of one record when other appends keep moving the chain head.
MAX_HEAD_RACES = 100
#: Fresh decisions of one read-decide-commit loop when what it read keeps changing.
MAX_DECISIONS = 50
#: How long a commit waits for the other commits of its process before it goes ahead and races
#: for the chain head (see Commits._serial): far above a commit's round trip, far below a timeout.
SERIAL_WAIT_S = 0.25
#: Per-commit keys that make a resent commit script idempotent (``_COMMIT``'s "d"): they only need
#: to outlive redis-py's resend after a timeout (socket timeout x 2 retries), not the request.
DONE, DONE_TTL_S = P + "done:", 60
#: A channel nobody listens on: ``PUBLISH`` to it is the cheapest command Redis replicates, the
#: write :meth:`Commits.confirm` waits for (``WAIT`` only waits for this connection's own writes).
BARRIER = P + "replication-barrier"
SECRET_FIELDS = frozenset({"token", "wk", "api_key", "key", "sealed_key", "data_key", "sig", "claim_secret"})

# KEYS: stream, head, then the state keys the program names by index (3, 4, ...).
# ARGV: genesis, expected head, record, its hash, program (JSON), webhook outbox ('' = the record
# is no event), then the subscription sets of its events (store/outbox.py): the record's id is
# queued only if one of them is non-empty (somebody listens).
# Program: {"g": guards, "w": writes, "n": [nonce key index, ttl]} (each part optional).
#   guard [op, key, field, value, extra]: "absent"/"present" (the key), "eq" (HGET == value),
#   "nofield" (HEXISTS == 0), "hlen" (HLEN == value); on a seat zset (store/seats.py):
#   "seat" (member field holds a live seat, score >= extra = now, or fewer than value members
#   are live: ZCOUNT now +inf < value), "zscore_le" (member field's score <= value: a lapsed
#   lease), "zmember" (member field is in the zset); the first failing one returns {-1, index}
#   and nothing is written.
#   "n": SET key 1 NX EX ttl; if the nonce was already there, nothing is written ({2, 0}).
#   write [command, key, args...]: redis.call(command, KEYS[key], args...).
#   "d": [done key, ttl]: this commit's own key (a random name; same hash tag, so the same slot):
#   set to the record's id with the record; found already set, the commit was applied by an
#   earlier send of this very call and its id is returned, nothing written again (see Commits.commit).
# Returns {1, id} when committed, or {0, current head} so a loser retries without a round trip.
_COMMIT = """
local prog = cjson.decode(ARGV[5])
local d = prog.d
if d then
  local done = redis.call('GET', d[1])
  if done then return {1, done} end
end
local head = redis.call('GET', KEYS[2]) or ARGV[1]
if head ~= ARGV[2] then return {0, head} end
for i, g in ipairs(prog.g or {}) do
  local op, k = g[1], KEYS[g[2]]
  local ok
  if op == 'absent' then ok = redis.call('EXISTS', k) == 0
  elseif op == 'present' then ok = redis.call('EXISTS', k) == 1
  elseif op == 'eq' then ok = redis.call('HGET', k, g[3]) == g[4]
  elseif op == 'nofield' then ok = redis.call('HEXISTS', k, g[3]) == 0
  elseif op == 'hlen' then ok = redis.call('HLEN', k) == tonumber(g[4])
  elseif op == 'seat' then
    local s = redis.call('ZSCORE', k, g[3])
    ok = (s and tonumber(s) >= tonumber(g[5])) or redis.call('ZCOUNT', k, g[5], '+inf') < tonumber(g[4])
  elseif op == 'zscore_le' then
    local s = redis.call('ZSCORE', k, g[3])
    ok = s ~= false and tonumber(s) <= tonumber(g[4])
  elseif op == 'zmember' then ok = redis.call('ZSCORE', k, g[3]) ~= false
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
if d then redis.call('SET', d[1], id, 'EX', d[2]) end
if ARGV[6] and ARGV[6] ~= '' then
  for i = 7, #ARGV do
    if redis.call('SCARD', ARGV[i]) > 0 then redis.call('LPUSH', ARGV[6], id); break end
  end
end
return {1, id}
"""


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

    def guard(self, op: str, key: str, field: str = "", value: str = "", extra: str | None = None) -> Change:
        self.guards.append([op, self._k(key), field, value] + ([] if extra is None else [extra]))
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

    def program(self, done: str | None = None) -> str:
        prog: dict[str, Any] = {"d": [done, DONE_TTL_S]} if done else {}
        if self.guards:
            prog["g"] = self.guards
        if self.writes:
            prog["w"] = self.writes
        if self.nonce:
            prog["n"] = self.nonce
        return json.dumps(prog, separators=(",", ":")) if prog else "{}"


def until_committed(attempt: Callable[[], T], *, what: str) -> T:
    """Run ``attempt`` (read, decide, commit) until its commit holds; a :class:`GuardFailed`
    means its reads went stale, so it reads and decides again."""
    for _ in range(MAX_DECISIONS):
        try:
            return attempt()
        except GuardFailed:
            continue
    raise Conflict(f"{what} is being changed by too many clients at once; retry")


class Commits:
    """Commits :class:`Change`\\ s with their audit records (see the module docstring).

    ``wait_replicas``: replicas that must hold a commit before it returns (0: do not wait, a
    single Redis), each commit waiting at most ``wait_timeout_ms``."""

    def __init__(self, r: RedisClient, *, wait_replicas: int = 0, wait_timeout_ms: int = 500) -> None:
        self.r = r
        self._commit = r.register_script(_COMMIT)
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        #: (when, head): the latest chain head a commit of this process saw (see :meth:`_guess`).
        self._seen: tuple[float, str] | None = None
        #: Commits of this process, one at a time: racing threads of one process for the one chain
        #: head cost 1.7-2.4 re-hashes per activation under load (each a round trip); in turn,
        #: each hashes against the head the previous one left (0.6-0.7 left, across processes).
        #: Not when waiting for replicas: a commit then holds its connection for a replica's ack,
        #: and queueing the process's commits behind that would cap them at 1 / ack latency.
        self._serial: threading.Lock | None = threading.Lock() if not wait_replicas else None

    def _run(self, keys: list[str], args: list[Any]) -> tuple[int, Any]:
        """The commit script, then (with replicas to wait for) ``WAIT`` on the same connection."""
        if not self.wait_replicas:
            status, value = self._commit(keys=keys, args=args)
            return int(status), value
        for _ in range(2):
            with self._primary().pipeline(transaction=False) as pipe:
                pipe.evalsha(self._commit.sha, len(keys), *keys, *args)
                pipe.wait(self.wait_replicas, self.wait_timeout_ms)
                result, acked = pipe.execute(raise_on_error=False)
            if isinstance(result, redis.exceptions.NoScriptError):  # a fresh primary: load it once
                self._primary().script_load(_COMMIT)
                continue
            if isinstance(result, redis.exceptions.MovedError):  # a cluster failover moved the slot
                self.r.nodes_manager.initialize()
                continue
            if isinstance(result, redis.exceptions.ResponseError) and str(result).startswith("NOREPLICAS"):
                raise NotReplicated("no replica is connected to the license database (min-replicas-to-write): "
                                    "nothing was written; retry shortly") from None
            if isinstance(result, Exception):
                raise result
            status, value = int(result[0]), result[1]
            if status == 1:
                self._confirmed(acked)
            return status, value
        raise NotReplicated("the commit could not run on the primary (its script was not loaded, or a failover "
                            "is moving the ledger's slot): nothing was written; retry shortly")

    def _primary(self) -> RedisClient:
        """The client whose connection both the commit and its ``WAIT`` go over.  On a cluster,
        the primary serving the ledger's slot (``WAIT`` has no key a cluster client could route
        by, and it only counts writes made on its own connection)."""
        if not is_cluster(self.r):
            return self.r
        return self.r.get_redis_connection(self.r.get_node_from_key(HEAD))

    def _confirmed(self, acked: Any) -> None:
        if isinstance(acked, Exception):
            raise acked
        if int(acked) < self.wait_replicas:
            raise NotReplicated(
                f"the change was applied but {int(acked)} of {self.wait_replicas} replica(s) confirmed it within "
                f"{self.wait_timeout_ms} ms, so it is not acknowledged: it may or may not survive a failover. "
                "Read it back before retrying a request that creates something")

    def confirm(self) -> None:
        """Return once ``wait_replicas`` replicas hold everything the primary held when called
        (a replicated no-op write on this connection, then ``WAIT``), else
        :class:`~layerlock.shared.errors.NotReplicated`.  For answers built from other clients'
        writes (a signed checkpoint): ``WAIT`` alone only covers this connection's own."""
        if not self.wait_replicas:
            return
        with self._primary().pipeline(transaction=False) as pipe:
            pipe.publish(BARRIER, "")
            pipe.wait(self.wait_replicas, self.wait_timeout_ms)
            _, acked = pipe.execute()
        self._confirmed(acked)

    def append(self, type_: str, *, actor: str = "", head: str | None = None, **fields: Any) -> str:
        """Append one record (no state change); returns its stream id.  Secret-looking fields are refused."""
        return self.commit(type_, None, actor=actor, head=head, **fields)

    def commit(self, type_: str, change: Change | None, *, actor: str = "", head: str | None = None,
               head_read_at: float | None = None, **fields: Any) -> str:
        """Apply ``change`` and append its record in one atomic step; returns the record's stream id.

        ``head``: the chain head if the caller already read it, and ``head_read_at`` when
        (``time.monotonic()``); see :meth:`_guess`.  A guard that does not hold raises
        :class:`GuardFailed`, a nonce already burnt :class:`Replayed`; either way nothing is written.
        """
        body = self._body(type_, actor, fields)
        change = change or Change()
        keys = [STREAM, HEAD, *change.keys]
        # redis-py resends a command whose reply timed out or whose connection dropped, and the
        # first send may have been applied: the done key makes the resend answer that commit's id
        # instead of appending the record twice (or calling a fresh grant "replayed" because the
        # first send burnt its nonce).  Records can be identical (two concurrent extensions read
        # the same state in the same millisecond), so only a key per call tells "mine" apart.
        program = change.program(done=f"{DONE}{secrets.token_hex(16)}")
        subscribers = outbox.keys_for(body)
        queue = [outbox.OUTBOX, *subscribers] if subscribers else [""]
        # a commit stuck on a Redis that hangs must not queue the others behind it for a timeout
        # each: past SERIAL_WAIT_S they go ahead and race (and time out side by side, as before)
        got = self._serial.acquire(timeout=SERIAL_WAIT_S) if self._serial else False
        try:
            return self._append(keys, body, program, queue, self._guess(head, head_read_at))
        finally:
            if got and self._serial:
                self._serial.release()

    def _append(self, keys: list[str], body: dict[str, Any], program: str, queue: list[str], prev: str) -> str:
        for _ in range(MAX_HEAD_RACES):
            canonical = dumps({**body, "prev": prev})
            h = digest(canonical)
            status, value = self._run(keys, [GENESIS, prev, canonical, h, program, *queue])
            at = time.monotonic()
            if status == 1:
                self._saw(h, at)
                return str(value)
            self._saw(value if status == 0 else prev, at)  # only a race moved the head past prev
            if status == 2:
                raise Replayed()
            if status == -1:
                raise GuardFailed(int(value) - 1)
            metrics.AUDIT_HEAD_RACES.inc()
            prev = value
        raise Conflict("the audit log is too contended; retry")

    def _guess(self, head: str | None, read_at: float | None) -> str:
        """The chain head to hash the record against: a wrong guess costs one more round trip
        (the script answers with the current head), a right one saves it.  Under load the head a
        request read at its start is nearly always stale by the time it commits -- other commits
        land while it checks a signature and signs a token: 1.7-2.4 re-hashes per activation in
        ``bench/activate.py`` -- so the head this process's own latest commit saw, when it saw it
        later than the caller read its head, is the better guess."""
        seen = self._seen
        if head is not None and (seen is None or read_at is None or read_at >= seen[0]):
            return head
        if seen is not None:
            return seen[1]
        return self.r.get(HEAD) or GENESIS

    def _saw(self, head: str, at: float) -> None:
        """Remember the chain head as of ``at`` (racing threads may overwrite a newer one with an
        older one: that only makes the next guess worse, never wrong -- the script checks)."""
        seen = self._seen
        if seen is None or at >= seen[0]:
            self._seen = (at, head)

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
        def attempt() -> tuple[dict[str, str], dict[str, str]]:
            with self.r.pipeline(transaction=False) as pipe:
                pipe.hgetall(k)
                pipe.get(HEAD)
                before, head = pipe.execute()
            if not before:
                raise NotFound(missing)
            fields = change(before)
            after = {**before, **fields}
            type_, doc = event(before, after)
            self.commit(type_, guard(Change(), before).hset(k, fields), actor=actor, head=head, **doc)
            return before, after

        return until_committed(attempt, what=what)

    def insert(self, type_: str, key: str, rec: dict[str, str], *, index: tuple[str, str, str],
               exists: str, actor: str, **event: Any) -> None:
        """Create the hash ``key`` and add it to its listing zset (``index``: zset, score, member)
        with its record, only if it does not exist yet — else :class:`Conflict` ``exists``,
        nothing written."""
        change = Change().guard("absent", key).hset(key, rec).write("ZADD", *index)
        try:
            self.commit(type_, change, actor=actor, **event)
        except GuardFailed:
            raise Conflict(exists) from None

    @staticmethod
    def _body(type_: str, actor: str, fields: dict[str, Any]) -> dict[str, Any]:
        leaked = SECRET_FIELDS & set(fields)
        if leaked:
            raise SecretInRecord(f"audit records never carry secrets ({', '.join(sorted(leaked))})")
        return {"type": type_, "ts": round(time.time(), 3), "actor": actor,
                **{k: v for k, v in fields.items() if v is not None}}

